import time, threading, sys, os, json
import torch, timm
from otbr_hub.load import from_model
from otbr_hub.detect import detect, DetectSettings
torch.manual_seed(0)
m = timm.create_model("resnet50", num_classes=1000).eval()
lm = from_model(m)
t0 = time.time(); marks = []
def hook(stage, done=0, total=None):
    marks.append((time.time() - t0, stage, done, total))
    if time.time() - t0 > 150:
        raise KeyboardInterrupt
try:
    detect(m, lm.spec, DetectSettings(), progress=hook)
except KeyboardInterrupt:
    pass
last = marks[-1]
first = next(x for x in marks if x[2] > 0)
rate = (last[2] - first[2]) / (last[0] - first[0])
print(json.dumps({"passes_done": last[2], "total": last[3], "seconds": round(last[0], 1), "passes_per_s": round(rate, 2),
                  "projected_total_h": round(last[3] / rate / 3600, 2), "threads": torch.get_num_threads()}))
