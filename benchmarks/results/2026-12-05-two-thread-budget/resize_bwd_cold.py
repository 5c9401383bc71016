import torch, time, statistics, segops, resource
g = torch.randn(1, 21, 256, 256)
big = torch.empty(100_000_000)
dst = torch.empty(21*512*512)
for th in (1, 2, 1, 2):
    torch.set_num_threads(th)
    ts = []; tf=[]; fl=[]
    for r in range(30):
        big.add_(1)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter(); y = torch.ops.segops._half_resolution_backward(g, [512, 512]); ts.append(time.perf_counter() - t)
        fl.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        del y
        big.add_(1)
        t = time.perf_counter(); dst.fill_(1.0); tf.append(time.perf_counter() - t)
    print(th, "hrb cold %.3f  fill_ cold %.3f faults %s" % (statistics.median(ts) * 1e3, statistics.median(tf)*1e3, fl[:8]))
