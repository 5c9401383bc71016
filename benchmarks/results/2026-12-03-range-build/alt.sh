# alt.sh script args... : alternate C_A.so / C_B.so, 4 pairs
cd /work/main
for i in 1 2 3 4; do
  for v in A B; do cp ./C_$v.so segops/_C.abi3.so; echo -n "$v: "; .venv/bin/python "$@"; echo; done
done
cp ./C_B.so segops/_C.abi3.so
