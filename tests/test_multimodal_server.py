"""Media through `qwenkit serve` (real processes) with the official `openai` client: images by data
URL, local file and allow-listed http URL, audio clips, video frames; every bad-media case is a 400
with a message, and the server keeps serving after each."""

import base64
import http.server
import io
import threading
from functools import partial

import numpy as np
import httpx
import ollama
import openai
import pytest
from PIL import Image

from qwenkit.engine import LLM, SamplingParams
from server_process import ServerProcess
from test_multimodal_engine import audio_part, image, png_url, text, user, wav_bytes
from tiny_models import save_tiny
from tiny_multimodal import save_tiny_multimodal_checkpoint

KEY = "sk-mm"


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "cat.png").write_bytes(png_bytes(image(100, 70)))
    (d / "big.png").write_bytes(png_bytes(image(300, 300, 3)))
    return d


@pytest.fixture(scope="module")
def http_media(media_dir):
    """A local http server holding the media files (the allow-listed origin)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(http.server.SimpleHTTPRequestHandler, directory=str(media_dir)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def vl_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("vl-server")
    save_tiny_multimodal_checkpoint("qwen2_5_vl", path)
    return path


@pytest.fixture(scope="module")
def vl_server(vl_path, media_dir):
    server = ServerProcess("--model", str(vl_path), "--api-key", KEY, "--served-model-name", "vl",
                           "--allowed-local-media-path", str(media_dir), "--allowed-media-domain", "127.0.0.1",
                           "--max-media-bytes", str(len((media_dir / "big.png").read_bytes()) - 1), "--max-media-pixels", str(28 * 28 * 64))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def vl_client(vl_server):
    return openai.OpenAI(base_url=vl_server.url + "/v1", api_key=KEY, max_retries=0)


def greedy(client, model, content, **extra):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          temperature=0, max_tokens=6, **extra)


def test_image_by_data_url_answers_as_the_library_does(vl_client, vl_server, vl_path):
    content = [{"type": "image_url", "image_url": {"url": png_url(image(100, 70))}}, {"type": "text", "text": "what is this"}]
    r = greedy(vl_client, "vl", content)
    expected = LLM(str(vl_path)).chat(user(*content), SamplingParams(temperature=0, max_tokens=6))[0]
    assert r.choices[0].message.content == expected.outputs[0].text
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)  # the placeholders, one per image token
    tokenized = httpx.post(vl_server.url + "/tokenize", json={"messages": [{"role": "user", "content": content}]},
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()
    assert tokenized["tokens"] == expected.prompt_token_ids
    # Streaming, and the same image again: its blocks come from the prefix cache.
    again = vl_client.chat.completions.create(model="vl", messages=[{"role": "user", "content": content}], temperature=0,
                                              max_tokens=6, stream=True, stream_options={"include_usage": True})
    chunks = list(again)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.outputs[0].text
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_image_from_allowed_file_and_url_and_video_frames(vl_client, media_dir, http_media):
    by_data = greedy(vl_client, "vl", [{"type": "image_url", "image_url": {"url": png_url(image(100, 70))}}, text("x")])
    by_file = greedy(vl_client, "vl", [{"type": "image_url", "image_url": {"url": (media_dir / "cat.png").as_uri()}}, text("x")])
    by_http = greedy(vl_client, "vl", [{"type": "image_url", "image_url": {"url": http_media + "/cat.png"}}, text("x")])
    assert by_data.choices[0].message.content == by_file.choices[0].message.content == by_http.choices[0].message.content
    frames = [png_url(image(140, 112, s)) for s in range(4)]
    r = greedy(vl_client, "vl", [{"type": "video", "video": frames}, text("what happens")],
               extra_body={"mm_processor_kwargs": {"max_pixels": 28 * 28 * 20, "fps": 1}})
    assert r.choices[0].finish_reason == "length"
    small = greedy(vl_client, "vl", [{"type": "image_url", "image_url": {"url": png_url(image(100, 70))}}, text("x")],
                   extra_body={"mm_processor_kwargs": {"max_pixels": 28 * 28 * 4}})
    assert small.usage.prompt_tokens < by_data.usage.prompt_tokens  # a smaller per-request budget: fewer image tokens


def bomb() -> str:
    """A PNG of 9000 x 9000 pixels in a few kilobytes."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(Image.new("1", (9000, 9000)))).decode()


BAD_MEDIA = {
    "undecodable image": ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}}], "cannot decode the image"),
    "bad base64": ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], "not valid base64"),
    "too many source pixels": ([{"type": "image_url", "image_url": {"url": bomb()}}], "too many pixels"),
    "url not allowed": ([{"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}], "not allowed"),
    "file outside the allowed dir": ([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}], "must lie under"),
    "too large a download": ([{"type": "image_url", "image_url": {"url": "{http}/big.png"}}], "larger than"),
    "audio to a vision model": ([audio_part(0.5)], "does not take audio"),
    "unknown part": ([{"type": "image_file", "image_file": {"file_id": "x"}}], "image_file"),
}


@pytest.mark.parametrize("case", list(BAD_MEDIA))
def test_bad_media_is_a_400_with_a_message_and_the_server_keeps_serving(vl_client, vl_server, http_media, case):
    content, message = BAD_MEDIA[case]
    content = [{**p, "image_url": {"url": p["image_url"]["url"].replace("{http}", http_media)}} if p["type"] == "image_url" else p for p in content]
    with pytest.raises(openai.BadRequestError) as err:
        greedy(vl_client, "vl", content + [text("what is it")])
    assert err.value.status_code == 400
    assert message in err.value.body["message"]
    assert vl_server.health()["status"] == "ok"
    assert greedy(vl_client, "vl", "still here?").choices[0].message.content is not None


def test_too_many_pixels_asked_for_is_a_400(vl_client):
    with pytest.raises(openai.BadRequestError) as err:
        greedy(vl_client, "vl", [{"type": "image_url", "image_url": {"url": png_url(image(100, 70))}}, text("x")],
               extra_body={"mm_processor_kwargs": {"max_pixels": 28 * 28 * 10_000}})
    assert "more than this server allows" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="max_pixels must be at least 784"):
        greedy(vl_client, "vl", [{"type": "image_url", "image_url": {"url": png_url(image(40, 40))}}],
               extra_body={"mm_processor_kwargs": {"max_pixels": 100}})
    with pytest.raises(openai.BadRequestError, match="mm_processor_kwargs|unsupported"):
        greedy(vl_client, "vl", [{"type": "image_url", "image_url": {"url": png_url(image(40, 40))}}], extra_body={"mm_processor_kwargs": {"size": 3}})


@pytest.fixture(scope="module")
def audio_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio-server")
    save_tiny_multimodal_checkpoint("qwen2_audio", path)
    server = ServerProcess("--model", str(path), "--served-model-name", "audio")
    yield path, server
    server.stop()


def test_audio_clip_gets_an_answer_and_an_image_is_refused(audio_server):
    path, server = audio_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    content = [{"type": "text", "text": "what is said?"}, audio_part(1.5)]
    r = greedy(client, "audio", content)
    expected = LLM(str(path)).chat(user(*content), SamplingParams(temperature=0, max_tokens=6))[0]
    assert r.choices[0].message.content == expected.outputs[0].text
    with pytest.raises(openai.BadRequestError, match="does not take images"):
        greedy(client, "audio", [{"type": "image_url", "image_url": {"url": png_url(image(30, 30))}}])
    junk = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF....WAVEjunk").decode(), "format": "wav"}}
    with pytest.raises(openai.BadRequestError, match="cannot decode the audio"):
        greedy(client, "audio", [junk])
    with pytest.raises(openai.BadRequestError, match="not allowed on this server"):  # local files are off by default
        greedy(client, "audio", [{"type": "audio_url", "audio_url": {"url": "file:///tmp/x.wav"}}])
    assert greedy(client, "audio", "hello").choices[0].finish_reason == "length"


def test_media_sent_to_a_text_only_model_is_a_400(tmp_path):
    save_tiny("qwen2", tmp_path)
    server = ServerProcess("--model", str(tmp_path), "--served-model-name", "text")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="text-only"):
            greedy(client, "text", [{"type": "image_url", "image_url": {"url": png_url(image(30, 30))}}, text("hi")])
        assert greedy(client, "text", [{"type": "text", "text": "hi"}]).choices[0].message.content is not None
    finally:
        server.stop()


def test_cli_chat_with_image_and_audio_files(vl_path, media_dir, audio_server, tmp_path):
    import subprocess
    import sys

    def cli(model, *flags):
        result = subprocess.run([sys.executable, "-m", "qwenkit.cli.main", "chat", "--model", str(model), "-p", "what is it",
                                 "--max-tokens", "5", "--temperature", "0", *flags], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout.rstrip("\n")

    params = SamplingParams(temperature=0, max_tokens=5)
    cat = media_dir / "cat.png"
    expected = LLM(str(vl_path)).chat(user({"type": "image", "image": str(cat)}, text("what is it")), params)[0].outputs[0].text
    assert cli(vl_path, "--image", str(cat)) == expected
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(1.0, 4))
    path, _ = audio_server
    expected = LLM(str(path)).chat(user({"type": "audio", "audio": str(clip)}, text("what is it")), params)[0].outputs[0].text
    assert cli(path, "--audio", str(clip)) == expected


def test_ollama_generate_images_answer_as_chat(vl_server):
    """/api/generate with `images`, through the official `ollama` client (it base64-encodes the
    bytes): the same greedy answer and prompt length as /api/chat with the image on the user turn;
    images with raw (no chat template to place them) or undecodable bytes are 400s."""
    img = png_bytes(image(90, 60))
    client = ollama.Client(host=vl_server.url, headers={"Authorization": f"Bearer {KEY}"})
    options = {"temperature": 0, "num_predict": 6}
    chat = client.chat("vl", [{"role": "user", "content": "what is this", "images": [img]}], options=options)
    generated = client.generate("vl", "what is this", images=[img], options=options)
    assert generated.response == chat.message.content
    assert generated.prompt_eval_count == chat.prompt_eval_count
    text_only = client.generate("vl", "what is this", options=options)
    assert text_only.prompt_eval_count < generated.prompt_eval_count  # the image's placeholders are in the prompt
    with pytest.raises(ollama.ResponseError, match="without raw"):
        client.generate("vl", "<|im_start|>user\nhi", images=[img], raw=True, options=options)
    with pytest.raises(ollama.ResponseError, match="cannot decode the image"):
        client.generate("vl", "what is this", images=[b"not an image"], options=options)


def test_batch_file_with_images_answers_as_the_library(vl_path, tmp_path):
    """`qwenkit batch` lines with image parts (data: URLs) answer as LLM.chat does with the same
    image; a line whose image cannot be decoded gets its 400 and the others run."""
    import json

    from qwenkit.cli.batch import run_batch

    params = SamplingParams(temperature=0, max_tokens=5)
    llm = LLM(str(vl_path))
    images = [image(100, 70), image(60, 90, seed=1)]
    lines = [{"custom_id": f"img-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "vl", "temperature": 0, "max_tokens": 5,
                       "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(img)}},
                                                                 {"type": "text", "text": "what is this"}]}]}}
             for i, img in enumerate(images)]
    broken = json.loads(json.dumps(lines[0]))
    broken["custom_id"] = "broken"
    broken["body"]["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64,bm90IGFuIGltYWdl"
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(json.dumps(line) for line in [*lines, broken]) + "\n")
    summary = run_batch(llm, inp, out, "vl")
    assert (summary.done, summary.failed) == (3, 1)
    results = {r["custom_id"]: r["response"] for r in map(json.loads, out.read_text().splitlines())}
    for i, img in enumerate(images):
        alone = llm.chat(user({"type": "image_url", "image_url": {"url": png_url(img)}}, text("what is this")), params)[0]
        assert results[f"img-{i}"]["status_code"] == 200
        assert results[f"img-{i}"]["body"]["choices"][0]["message"]["content"] == alone.outputs[0].text
        assert results[f"img-{i}"]["body"]["usage"]["prompt_tokens"] == len(alone.prompt_token_ids)  # the image's placeholders
    assert results["broken"]["status_code"] == 400 and "cannot decode the image" in results["broken"]["body"]["error"]["message"]


def test_ollama_chat_images_answer_as_the_openai_route(vl_server, vl_client):
    img = image(100, 70)
    openai_answer = greedy(vl_client, "vl", [{"type": "image_url", "image_url": {"url": png_url(img)}}, text("what is this")])
    body = {"model": "vl", "stream": False, "options": {"temperature": 0, "num_predict": 6},
            "messages": [{"role": "user", "content": "what is this", "images": [base64.b64encode(png_bytes(img)).decode()]}]}
    r = httpx.post(vl_server.url + "/api/chat", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["message"]["content"] == openai_answer.choices[0].message.content
    assert r.json()["prompt_eval_count"] == openai_answer.usage.prompt_tokens
    bad = {**body, "messages": [{"role": "user", "content": "x", "images": ["bm90IGFuIGltYWdl"]}]}
    r = httpx.post(vl_server.url + "/api/chat", json=bad, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert r.status_code == 400 and "cannot decode the image" in r.text
