"""Drives `prefix-attn serve` with the official `openai` Python client and checks that every
completion equals offline `prefix-attn generate` for the same adapter, prompt and settings:
greedy and seeded sampling, streamed and not, over several adapters and the bare model, plus
`models.list()` and the error the client raises for an unknown model.

    pip install openai
    python tools/serve_openai_check.py target/debug/prefix-attn

Exits 0 when every check passes (prints one line per check), 1 otherwise. Needs only the
committed fixture `tests/fixtures/gpt2/tiny-a` (a second adapter is made from it by adding
noise, in plain Python: no numpy, no torch).
"""

import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FX = os.path.join(ROOT, "tests", "fixtures", "gpt2", "tiny-a")


def perturbed_adapter(dst):
    """Copies the fixture adapter to dst with every f32 of its safetensors file moved by noise."""
    src = os.path.join(FX, "adapter")
    shutil.copytree(src, dst)
    path = os.path.join(dst, "adapter_model.safetensors")
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    rng = random.Random(7)
    base = 8 + n
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", t
        a, b = t["data_offsets"]
        count = (b - a) // 4
        vals = struct.unpack(f"<{count}f", raw[base + a : base + b])
        vals = [v + rng.gauss(0.0, 0.5) for v in vals]
        raw[base + a : base + b] = struct.pack(f"<{count}f", *vals)
    with open(path, "wb") as f:
        f.write(raw)


def offline(exe, adapters, lines, extra):
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
        data = f.name
    try:
        args = [exe, "generate", "--model", os.path.join(FX, "model"), "--data", data]
        for name, d in adapters.items():
            args += ["--adapter", f"{name}={d}"]
        out = subprocess.run(args + extra, check=True, capture_output=True, text=True).stdout
        return [json.loads(l) for l in out.splitlines()]
    finally:
        os.unlink(data)


def main():
    exe = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug", "prefix-attn")
    tmp = tempfile.mkdtemp(prefix="prefix-attn-openai-")
    failures = []

    def check(name, ok, detail=""):
        print(("ok   " if ok else "FAIL ") + name + ("" if ok else f": {detail}"))
        if not ok:
            failures.append(name)

    server = None
    try:
        adapters = {"fx": os.path.join(FX, "adapter"), "noisy": os.path.join(tmp, "noisy")}
        perturbed_adapter(adapters["noisy"])
        args = [exe, "serve", "--model", os.path.join(FX, "model"), "--port", "0",
                "--api-key", "test-key", "--served-model-name", "tiny"]
        for name, d in adapters.items():
            args += ["--adapter", f"{name}={d}"]
        server = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        addr = None
        for line in server.stderr:
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                addr = m.group(1)
                break
        if addr is None:
            print("the server did not start")
            return 1
        # Keep draining its stderr.
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
        client = openai.OpenAI(base_url=addr + "/v1", api_key="test-key")

        ids = [m.id for m in client.models.list().data]
        check("models.list", ids == ["tiny", "fx", "noisy"], ids)

        prompt = "name : The Eagle |"
        for model, adapter in [("fx", "fx"), ("noisy", "noisy"), ("tiny", None)]:
            want = offline(exe, adapters, [{"prompt": prompt, "adapter": adapter,
                                            "max_new_tokens": 12}], [])[0]
            r = client.completions.create(model=model, prompt=prompt, max_tokens=12,
                                          temperature=0)
            got = r.choices[0]
            check(f"greedy {model}", got.text == want["text"]
                  and got.finish_reason == want["finish_reason"]
                  and r.usage.completion_tokens == len(want["ids"]), (got, want))
            text = "".join(c.choices[0].text for c in client.completions.create(
                model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True)
                if c.choices)
            check(f"greedy {model} streamed", text == want["text"], (text, want["text"]))

        lines = [{"prompt": prompt, "adapter": "noisy", "max_new_tokens": 10}] * 2
        want = offline(exe, adapters, lines, ["--temperature", "0.8", "--top-p", "0.9",
                                              "--seed", "1234"])
        r = client.completions.create(model="noisy", prompt=prompt, max_tokens=10, n=2,
                                      temperature=0.8, top_p=0.9, seed=1234)
        got = sorted(r.choices, key=lambda c: c.index)
        check("seeded sampling, n = 2", [c.text for c in got] == [w["text"] for w in want],
              ([c.text for c in got], [w["text"] for w in want]))
        text = ["", ""]
        for c in client.completions.create(model="noisy", prompt=prompt, max_tokens=10, n=2,
                                           temperature=0.8, top_p=0.9, seed=1234, stream=True):
            for ch in c.choices:
                text[ch.index] += ch.text
        check("seeded sampling streamed", text == [w["text"] for w in want],
              (text, [w["text"] for w in want]))

        try:
            client.completions.create(model="nope", prompt=prompt, max_tokens=2)
            check("unknown model is NotFoundError", False, "no error")
        except openai.NotFoundError as e:
            check("unknown model is NotFoundError", e.status_code == 404)
        try:
            openai.OpenAI(base_url=addr + "/v1", api_key="wrong").models.list()
            check("wrong key is AuthenticationError", False, "no error")
        except openai.AuthenticationError as e:
            check("wrong key is AuthenticationError", e.status_code == 401)
    finally:
        if server is not None:
            server.terminate()
            rc = server.wait(timeout=60)
            check("SIGTERM exits 0", rc == 0, rc)
        shutil.rmtree(tmp, ignore_errors=True)
    print("all checks passed" if not failures else f"{len(failures)} checks failed")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
