"""ONNX Runtime side of `bench/step-side-by-side --int8`: one inference pass of the same
randomly initialised transformers classifier as torch_step_bench.py (same preset, seed,
batch, sequence and threads), exported to ONNX and quantized with ONNX Runtime's dynamic
int8 quantization (`onnxruntime.quantization.quantize_dynamic`, its defaults: int8 weights
per tensor, uint8 activations quantized per call). Timed like the others (median over N
passes after 2 warm-up passes); prints one JSON line. `--precision f32` runs the exported
f32 graph instead.
Usage: python ort_step_bench.py infer --preset PRESET --batch B --seq S --steps N --threads T
       [--precision int8|f32]
"""
import os
import tempfile

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from torch_step_bench import build_model, parse_args, report, time_steps


def main():
    a = parse_args(precisions=("int8", "f32"))
    assert a.mode == "infer", "ONNX Runtime is measured for inference only"
    torch.set_num_threads(a.threads)
    model = build_model(a).eval()
    ids = torch.randint(1000, 30000, (a.batch, a.seq))
    mask = torch.ones_like(ids)
    with tempfile.TemporaryDirectory() as d:
        f32_path, q_path = os.path.join(d, "model.onnx"), os.path.join(d, "model.int8.onnx")
        torch.onnx.export(model, (ids, mask), f32_path, input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})
        path = f32_path
        if a.precision == "int8":
            quantize_dynamic(f32_path, q_path, weight_type=QuantType.QInt8)
            path = q_path
        del model
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy().astype(np.int64)}
    report(a, time_steps(lambda: sess.run(["logits"], feed), a.steps), onnxruntime=ort.__version__)

if __name__ == "__main__":
    main()
