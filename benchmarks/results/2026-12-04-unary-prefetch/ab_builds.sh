# Process-alternated A/B of two builds of the extension (run from the repository root):
#   SO_A=/tmp/C_A.so SO_B=/tmp/C_B.so bash benchmarks/results/2026-12-04-unary-prefetch/ab_builds.sh 4 SCRIPT
# Each round loads A, then B, each in a fresh process; the B module is left in place afterwards.
set -e
rounds=$1; shift
for i in $(seq "$rounds"); do
  for v in A B; do
    so_var="SO_$v"
    cp "${!so_var}" segops/_C.abi3.so
    echo -n "$v: "
    .venv/bin/python "$@"
  done
done
