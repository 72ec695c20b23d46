#!/usr/bin/env python3
"""A minimal batched PyTorch + transformers server, the yardstick for `ferrotune serve`.

Same request and response shape as ferrotune's POST /predict (TEI's):
  {"inputs": "text" | ["t1", "t2"] | [["a", "b"]], "raw_scores": false, "truncate": true}
  -> for each input [{"label": ..., "score": ...}, ...], highest first (one list for a
     single string input).
GET /health answers {"status": "ok"}; GET /stats {"batches": .., "inputs": ..} so far.

Python's standard ThreadingHTTPServer (one thread per connection, HTTP/1.1 keep-alive)
queues each request; one worker thread takes every queued request up to --max-batch-requests
and runs them as one padded batch under torch.inference_mode. Only what the benchmark needs
is checked (bad JSON or a bad `inputs` is a 400/422; an over-long input is always truncated).

Run it with the python that bench/torch-env prints:
  PY=$(bench/torch-env | tail -n1)
  $PY bench/torch_serve.py --model runs/bench-bbc/model --port 8081 --threads 2
PyTorch is never a dependency of ferrotune.
"""

import argparse
import json
import os
import queue
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="exported model directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8081)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    ap.add_argument("--max-batch-requests", type=int, default=64, help="requests per batch (1: no batching)")
    ap.add_argument("--precision", default="f32", choices=["f32", "bf16", "int8"],
                    help="f32; bf16 autocast (fast only on CPUs with avx512_bf16/AMX); int8: "
                         "torch.ao.quantization.quantize_dynamic of the linear layers")
    return ap.parse_args()


class Job:
    __slots__ = ("inputs", "raw", "done", "result", "error")

    def __init__(self, inputs, raw):
        self.inputs, self.raw = inputs, raw
        self.done = threading.Event()
        self.result = self.error = None


def main():
    args = parse_args()
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    if args.precision == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    cfg = json.load(open(os.path.join(args.model, "config.json")))
    max_len = cfg.get("ferrotune", {}).get("max_seq_length", tok.model_max_length)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    multi = model.config.problem_type == "multi_label_classification"
    regression = model.config.problem_type == "regression"
    jobs = queue.Queue()
    stats = {"batches": 0, "inputs": 0}

    def worker():
        while True:
            batch = [jobs.get()]
            while len(batch) < args.max_batch_requests:
                try:
                    batch.append(jobs.get_nowait())
                except queue.Empty:
                    break
            texts = [t for j in batch for t, _ in j.inputs]
            stats["batches"] += 1
            stats["inputs"] += len(texts)
            pairs = [p for j in batch for _, p in j.inputs]
            try:
                enc = tok(texts, pairs if any(p is not None for p in pairs) else None,
                          truncation=True, max_length=max_len, padding=True,
                          return_tensors="pt")
                with torch.inference_mode(), torch.autocast(
                        "cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                    logits = model(**enc).logits.float()
                if regression:
                    probs = logits
                elif multi:
                    probs = torch.sigmoid(logits)
                else:
                    probs = torch.softmax(logits, dim=-1)
                logits, probs = logits.tolist(), probs.tolist()
                k = 0
                for j in batch:
                    n = len(j.inputs)
                    j.result = (logits if j.raw else probs)[k:k + n]
                    k += n
            except Exception as e:  # answered as a 500, never kills the worker
                for j in batch:
                    j.error = str(e)
            for j in batch:
                j.done.set()

    threading.Thread(target=worker, daemon=True).start()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def send_json(self, status, obj):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self.send_json(200, {"status": "ok"})
            elif self.path == "/stats":
                self.send_json(200, dict(stats))
            else:
                self.send_json(404, {"error": "not found", "error_type": "not_found"})

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            raw_body = self.rfile.read(n)
            if self.path != "/predict":
                return self.send_json(404, {"error": "not found", "error_type": "not_found"})
            try:
                req = json.loads(raw_body)
            except ValueError as e:
                return self.send_json(400, {"error": f"not JSON: {e}", "error_type": "validation"})
            inputs = req.get("inputs") if isinstance(req, dict) else None
            single = isinstance(inputs, str)
            items = [inputs] if single else inputs
            if not isinstance(items, list) or not items:
                return self.send_json(422, {"error": "bad `inputs`", "error_type": "validation"})
            parsed = []
            for it in items:
                if isinstance(it, str):
                    parsed.append((it, None))
                elif isinstance(it, list) and len(it) == 2 and all(isinstance(x, str) for x in it):
                    parsed.append((it[0], it[1]))
                else:
                    return self.send_json(422, {"error": "bad `inputs`", "error_type": "validation"})
            job = Job(parsed, bool(req.get("raw_scores", False)))
            jobs.put(job)
            job.done.wait()
            if job.error is not None:
                return self.send_json(500, {"error": job.error, "error_type": "backend"})
            lists = [sorted(({"label": l, "score": s} for l, s in zip(labels, row)),
                            key=lambda x: -x["score"]) for row in job.result]
            self.send_json(200, lists[0] if single else lists)

    class Server(ThreadingHTTPServer):
        request_queue_size = 1024
        daemon_threads = True

        def handle_error(self, request, client_address):
            if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                super().handle_error(request, client_address)

    server = Server((args.host, args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"torch_serve: {args.model} on http://{args.host}:{args.port} "
          f"({args.threads} threads, max_batch_requests {args.max_batch_requests}, {args.precision})",
          file=sys.stderr, flush=True)
    server.serve_forever()
    sys.stderr.flush()
    os._exit(0)  # the worker thread may be inside torch; do not wait for it


if __name__ == "__main__":
    main()
