from segops.cli import main

raise SystemExit(main())
