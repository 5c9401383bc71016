# Process-alternated A/B of two builds: run from the repository root with the two builds' extension modules
# saved as $SO_A and $SO_B, e.g.
#   SO_A=/tmp/C_A.so SO_B=/tmp/C_B.so bash benchmarks/results/2026-12-03-range-build/alt.sh \
#       benchmarks/results/2026-12-03-range-build/lat_time.py 1
# Each pair loads A, then B, in fresh processes (ROUNDS pairs, default 4); the B module is left in place afterwards.
set -e
for i in $(seq "${ROUNDS:-4}"); do
  for v in A B; do
    so_var="SO_$v"
    cp "${!so_var}" segops/_C.abi3.so
    echo -n "$v: "
    .venv/bin/python "$@"
    echo
  done
done
