"""End-to-end latency of a model: `python bench/run_model.py [MODEL.onnx] [--threads 1 2]`.

Without MODEL, exports an untrained fmnist_bnn (the repo's spine model; latency does not depend on the
weights) to a temporary folder and benchmarks that."""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--repeat", type=int, default=21)
    a = ap.parse_args()
    import bnnc
    from bnnc.bench import format_model_result, run_model_bench

    with tempfile.TemporaryDirectory() as d:
        path = a.model
        if path is None:
            import torch

            torch.manual_seed(0)
            net = bnnc.models.create("fmnist_bnn").eval()
            path = str(bnnc.export(net, os.path.join(d, "fmnist_bnn.onnx"), input_shape=(1, 1, 28, 28)))
        for t in a.threads:
            print(format_model_result(run_model_bench(path, threads=t, repeat=a.repeat)), flush=True)


if __name__ == "__main__":
    main()
