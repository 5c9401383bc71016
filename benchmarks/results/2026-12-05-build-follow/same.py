# Compares two files of save_lat2.py (or ../2026-12-05-inline-build/save_grads.py) tensor by tensor, bitwise.
import torch, sys
a=torch.load(sys.argv[1]); b=torch.load(sys.argv[2])
def flat(x):
    if isinstance(x,(list,tuple)):
        for y in x: yield from flat(y)
    else: yield x
fa=list(flat(a)); fb=list(flat(b))
assert len(fa)==len(fb)
bad=[i for i,(x,y) in enumerate(zip(fa,fb)) if x.shape!=y.shape or not torch.equal(x,y)]
print(len(fa),"tensors; differing:",bad)
