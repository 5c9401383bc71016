# exp_poly (the mean-field ops' exp) against float64 exp, emulated in numpy with and without fused multiply-adds
# (an FMA as a float64 a * b + c rounded to float32; that double rounding can differ from a true FMA by 1 ulp in rare
# cases): the largest relative errors in float32 eps over 8 M arguments.
import numpy as np
f=np.float32
def exp_poly(x, fma):
    x=np.clip(x.astype(np.float32), f(-87), f(88))
    def madd(a,b,c):
        if fma: return (a.astype(np.float64)*b.astype(np.float64)+np.float64(c) if np.isscalar(c) else a.astype(np.float64)*b.astype(np.float64)+c.astype(np.float64)).astype(np.float32)
        return (a*b + (f(c) if np.isscalar(c) else c)).astype(np.float32)
    magic=f(12582912.0)
    t=madd(x, np.full_like(x, f(1.44269504088896341)), magic)
    n=(t-magic).astype(np.float32)
    r1 = madd(-n, np.full_like(x,f(0.693145751953125)), x) if fma else (x - n*f(0.693145751953125)).astype(np.float32)
    r = madd(-n, np.full_like(x,f(1.428606765330187045e-06)), r1) if fma else (r1 - n*f(1.428606765330187045e-06)).astype(np.float32)
    p=np.full_like(x, f(1/720))
    for c in (1/120,1/24,1/6,0.5,1.0,1.0):
        p=madd(p,r,f(c))
    return (p*np.exp2(n.astype(np.float64))).astype(np.float64), x
rng=np.random.default_rng(0)
x=np.concatenate([rng.uniform(-87,88,4_000_000), rng.uniform(-2,2,4_000_000), np.repeat(np.arange(-87,88,0.6931471805599453/2),200)+rng.uniform(-1e-4,1e-4,101000)]).astype(np.float32)
eps=np.finfo(np.float32).eps
for fma in (False, True):
    v, xc = exp_poly(x, fma)
    rel=np.abs(v/np.exp(xc.astype(np.float64))-1)
    print("fma" if fma else "plain", rel.max()/eps)
a,_=exp_poly(x,False); b,_=exp_poly(x,True); print("diff", (np.abs(a-b)/a).max()/eps)
