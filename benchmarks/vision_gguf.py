"""Qwen2.5-VL as llama.cpp ships it, a language model GGUF plus an mmproj, through `qwenkit serve` and
llama-server on the same two files, the same images and the same client, in the same run.

The files: a random Qwen2.5-VL with the real vision tower's dimensions (Qwen2.5-VL-3B: 32 blocks of
width 1280, windows of 112 px, full attention in blocks 7/15/23/31) and a 2-layer language model of
the real width (2048), written by llama.cpp's own convert_hf_to_gguf.py: the language model in Q8_0,
the mmproj in f16, the types published VL GGUFs use. (A 2-layer language model: the row measures the
image's path, encoder plus prefill; a full 36-layer 3B language model adds the same prefill cost to both.)

Per round a new random 448x448 image (256 image tokens, no resize in either), one request to each
server (which one goes first alternates): time to the first token through HTTP (encode + prefill +
one token), the prompt tokens each server counted. Then greedy text of both for 8 tokens: same
weights, same pixels, so they should agree.

    python benchmarks/vision_gguf.py --llama-cpp VENDOR/llama.cpp --llama-server BUILD/bin/llama-server [--rounds 3]

--llama-cpp is a llama.cpp source tree (the vendor/llama.cpp of the llama-cpp-python sdist), for its
converter; the converted files are kept in --workdir and reused.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import transformers
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "fixtures"), str(ROOT / "benchmarks")]

from make_mmproj_gguf import convert  # noqa: E402
from serving import wait_ready  # noqa: E402
from server_process import ServerProcess, free_port  # noqa: E402
from tiny_multimodal import IMAGE, VIDEO, VISION_END, VISION_START, randomize, tiny_multimodal_tokenizer  # noqa: E402

from qwenkit.multimodal.templates import default_template  # noqa: E402

SIDE = 448


def build_files(workdir: Path, llama_cpp: Path, depth: int) -> tuple[Path, Path]:
    model, mmproj = workdir / f"vl-d{depth}-Q8_0.gguf", workdir / f"mmproj-vl-d{depth}-f16.gguf"
    if model.exists() and mmproj.exists():
        return model, mmproj
    text = dict(vocab_size=300, hidden_size=2048, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=16,
                num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    vision = dict(depth=depth, hidden_size=1280, intermediate_size=3420, out_hidden_size=2048, num_heads=16,
                  window_size=112, fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < depth], tokens_per_second=2)
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                                           vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    ref = transformers.Qwen2_5_VLForConditionalGeneration._from_config(config).eval()
    randomize(ref)
    checkpoint = workdir / f"hf-d{depth}"
    ref.save_pretrained(checkpoint)
    tokenizer = tiny_multimodal_tokenizer()
    tokenizer.chat_template = default_template("qwen2_5_vl")  # in the GGUF, so both servers render the same prompt
    tokenizer.save_pretrained(checkpoint)
    (checkpoint / "preprocessor_config.json").write_text(
        '{"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}')
    convert(llama_cpp, checkpoint, ["--outtype", "q8_0", "--outfile", str(model)])
    convert(llama_cpp, checkpoint, ["--mmproj", "--outtype", "f16", "--outfile", str(mmproj)])
    return model, mmproj


class LlamaServer:
    def __init__(self, binary: str, model: Path, mmproj: Path, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([binary, "-m", str(model), "--mmproj", str(mmproj), "--port", str(self.port),
                                      "-t", str(threads), "-tb", str(threads), "-c", "4096", "-np", "1", "--jinja"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ready(self.url, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def image_url(seed: int) -> str:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask(url: str, image: str, max_tokens: int, **extra) -> tuple[float, dict]:
    body = {"model": "vl", "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Describe the picture."}]}], **extra}
    start = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - start, r.json()


def greedy_agreement(model: Path, mmproj: Path, llama_url: str, steps: int = 8) -> str:
    """Greedy token ids of qwenkit (LLM.chat) and llama-server (/completion, the same rendered prompt with
    its media marker for the image) on the same files and image: ids and logprobs side by side. (Its
    chat route reports no token ids, and no logprobs for tokens that end inside a UTF-8 character,
    which a random model's bytes mostly are.)"""
    from qwenkit.engine import LLM, SamplingParams

    image = image_url(77)
    llm = LLM(str(model), mmproj=str(mmproj))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Describe the picture."}]}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, logprobs=0))[0]
    pads = out.prompt_token_ids.count(IMAGE)
    marker = httpx.get(llama_url + "/props", timeout=30).json()["media_marker"]
    rendered = llm.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
    prompt = rendered.replace("<|vision_start|>" + "<|image_pad|>" * pads + "<|vision_end|>", marker)
    reply = httpx.post(llama_url + "/completion", timeout=600, json={
        "prompt": {"prompt_string": prompt, "multimodal_data": [image.split(",", 1)[1]]}, "n_predict": steps,
        "temperature": 0, "top_k": 1, "n_probs": 1, "return_tokens": True, "cache_prompt": False, "ignore_eos": True}).json()
    ours = out.outputs[0].token_ids
    theirs = reply["tokens"]
    verdict = "identical" if ours == theirs else "DIFFERENT"
    lp_ours = " ".join(f"{e.logprob:.3f}" for e in out.outputs[0].logprobs)
    lp_theirs = " ".join(f"{p['logprob']:.3f}" for p in reply.get("completion_probabilities", []))
    return (f"greedy {steps} tokens, same files and image ({pads} image tokens, {reply.get('tokens_evaluated')} prompt tokens "
            f"in llama-server, {len(out.prompt_token_ids)} in qwenkit): {verdict}\n  qwenkit      {ours} logprobs {lp_ours}\n"
            f"  llama-server {theirs} logprobs {lp_theirs}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp source tree (for convert_hf_to_gguf.py)")
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--workdir", default="/tmp/qwenkit-vision-gguf")
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-server's -t (qwenkit uses every core)")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model, mmproj = build_files(workdir, Path(args.llama_cpp), args.depth)
    print(f"files: {model.name} {model.stat().st_size / 1e6:.0f} MB, {mmproj.name} {mmproj.stat().st_size / 1e6:.0f} MB; "
          f"{args.threads} threads; {SIDE}x{SIDE} images")
    ours = ServerProcess("--model", str(model), "--mmproj", str(mmproj), "--served-model-name", "vl")  # all cores, as llama-server's -t
    theirs = LlamaServer(args.llama_server, model, mmproj, args.threads)
    servers = {"qwenkit serve": ours.url, "llama-server": theirs.url}
    try:
        ask(ours.url, image_url(10_000), 1)  # warm-up of both (first-call allocations)
        ask(theirs.url, image_url(10_001), 1)
        times: dict[str, list[float]] = {name: [] for name in servers}
        prompt_tokens: dict[str, set[int]] = {name: set() for name in servers}
        for r in range(args.rounds):
            image = image_url(r)
            order = list(servers) if r % 2 == 0 else list(servers)[::-1]
            for name in order:
                seconds, reply = ask(servers[name], image, 1)
                times[name].append(seconds)
                prompt_tokens[name].add(reply["usage"]["prompt_tokens"])
        ours.stop()
        agreement = greedy_agreement(model, mmproj, theirs.url)
    finally:
        ours.stop()
        theirs.stop()
    print(f"\n{'time to first token, s (image + prompt)':44}{'rounds':>30}{'median':>9}{'prompt tokens':>15}")
    for name in servers:
        runs = " ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:44}{runs:>30}{np.median(times[name]):>9.2f}{','.join(map(str, sorted(prompt_tokens[name]))):>15}")
    ratio = np.median(times["llama-server"]) / np.median(times["qwenkit serve"])
    print(f"\nllama-server time / qwenkit time (median): {ratio:.2f}x (>1: qwenkit faster)")
    print(agreement)
    torch.set_num_threads(args.threads)
    a = torch.randn(2048, 2048)
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    rate = 5 * 2048**3 / (time.perf_counter() - start) / 1e9
    flops = 256 * 4 * args.depth * (4 * 1280**2 + 3 * 1280 * 3420) / 1e9  # 1024 patches; MACs of the tower's matmuls
    print(f"bound: float32 matmul {rate:.0f} G MAC/s here; the tower's {flops:.0f} G MAC take >= {flops / rate:.1f} s at that rate")


if __name__ == "__main__":
    main()
