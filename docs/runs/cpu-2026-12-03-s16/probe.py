import time, torch, statistics as st
torch.set_num_threads(1)
a = torch.randn(256, 256)
def once():
    t = time.perf_counter()
    for _ in range(200):
        a @ a
    return (time.perf_counter() - t) * 1000
out = []
t0 = time.time()
while time.time() - t0 < 150:
    out.append(round(once(), 1))
    time.sleep(0.5)
print(len(out), "min %.1f p50 %.1f max %.1f" % (min(out), st.median(out), max(out)))
print(out)
