"""LoRA: adapters against peft, the PEFT file format both ways, merge, SFT data, training, torchrun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from qwenkit.cli.main import main as cli
from qwenkit.engine.llm import LLM
from qwenkit.engine.llm_engine import EngineConfig
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.errors import QwenkitError
from qwenkit.lora.attach import adapter_weights, add_new_adapter, load_adapter
from qwenkit.lora.peft_format import LoraConfig, save_adapter
from qwenkit.model.adapters import LoraRouting
from qwenkit.model.attention import NoCache, PackedSequences
from qwenkit.tokenizer.tokenizer import Tokenizer
from qwenkit.training.data import IGNORE_INDEX, encode_record, load_dataset
from qwenkit.training.packing import Batch, pack
from qwenkit.training.trainer import LoraTrainer, TrainingConfig
from qwenkit.weights.loader import load_model
from server_process import ServerProcess
from test_errors import assert_one_line_error, run_cli
from tiny_models import save_tiny, tiny_tokenizer

DATA = Path(__file__).parent / "data"
IDS = torch.tensor([1, 5, 9, 30, 200, 7, 45, 12, 280, 3])
ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# ChatML with {% generation %} marks: transformers derives its own assistant mask from them.
CHATML_GENERATION = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """qwen2 and qwen3 tiny models on disk, with their transformers references."""
    models = {}
    for arch in ("qwen2", "qwen3"):
        path = tmp_path_factory.mktemp(arch)
        save_tiny(arch, path)
        models[arch] = path
    return models


def reference(path):
    """A fresh transformers model from disk (peft modifies the model it wraps)."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def qwenkit_logits(model, ids=IDS, adapter=None):
    positions = torch.arange(len(ids))
    lora = None if adapter is None else LoraRouting.all(adapter)
    with torch.no_grad():
        return model.compute_logits(model(ids, positions, NoCache(positions), lora), lora)


def peft_model(base, tmp_path, **kwargs):
    """A peft model with random (non-zero) A and B, saved by peft itself."""
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, **kwargs)
    model = peft.get_peft_model(base, config).eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_loads_in_qwenkit(tiny, tmp_path, arch, use_rslora):
    path = tiny[arch]
    made_by_peft = peft_model(reference(path), tmp_path / "adapter", target_modules=ATTENTION_AND_MLP, use_rslora=use_rslora,
                              rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3})
    loaded = load_model(str(path))
    load_adapter(loaded.model, "a", tmp_path / "adapter")
    with torch.no_grad():
        expected = made_by_peft(IDS[None]).logits[0]
        base = made_by_peft.get_base_model()
        with made_by_peft.disable_adapter():
            base_logits = base(IDS[None]).logits[0]
    assert (qwenkit_logits(loaded.model, adapter="a") - expected).abs().max() < 1e-5
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter matters


def test_qwenkit_adapter_loads_in_peft_and_merges(tiny, tmp_path):
    path = tiny["qwen2"]
    loaded = load_model(str(path))
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    add_new_adapter(loaded.model, "mine", config, seed=3)
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for _, b in adapter_weights(loaded.model, "mine").values():
            b.normal_(0, 0.2)
    save_adapter(tmp_path / "adapter", config, adapter_weights(loaded.model, "mine"))
    ours = qwenkit_logits(loaded.model, adapter="mine")

    in_peft = peft.PeftModel.from_pretrained(reference(path), tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = in_peft(IDS[None]).logits[0]
    assert (ours - theirs).abs().max() < 1e-5

    assert cli(["merge", str(path), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(IDS[None]).logits[0] - theirs).abs().max() < 1e-4


def test_adapter_for_another_base_is_refused(tiny, tmp_path):
    peft_model(reference(tiny["qwen3"]), tmp_path / "adapter", target_modules=["q_proj"])
    loaded2 = load_model(str(tiny["qwen2"]))
    with pytest.raises(QwenkitError, match="another base model"):
        load_adapter(loaded2.model, "x", tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(QwenkitError, match="use_dora"):
        load_adapter(loaded2.model, "x", tmp_path / "adapter")


def test_labels_match_transformers_assistant_mask(tmp_path):
    """Only assistant text (and its <|im_end|>) is trained: the mask transformers derives from {% generation %}."""
    hf = tiny_tokenizer(chat_template=CHATML_GENERATION)
    hf.save_pretrained(tmp_path)
    ours = Tokenizer.from_hf_dir(tmp_path)
    records = [json.loads(line) for line in (DATA / "sft_train.jsonl").read_text().splitlines()[:6]]
    checked_multi_turn = False
    for record in records:
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]},
                                              {"role": "assistant", "content": record["completion"]}]
        expected = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        example = encode_record(ours, record)
        assert example.token_ids == expected["input_ids"]
        assert [int(label != IGNORE_INDEX) for label in example.labels] == expected["assistant_masks"]
        trained = ours.decode([t for t, label in zip(example.token_ids, example.labels) if label != IGNORE_INDEX])
        answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert trained == "".join(answers)  # hand-checkable: nothing of system, user or role headers
        checked_multi_turn |= len(answers) > 1
    assert checked_multi_turn


def test_packed_examples_do_not_see_each_other(tiny):
    path = tiny["qwen2"]
    loaded = load_model(str(path))
    dataset = load_dataset(DATA / "sft_train.jsonl", loaded.tokenizer, 128)
    rows = pack(dataset.examples[:6], 400)
    row = next(r for r in rows if len(r.lengths) >= 2)
    batch = Batch.of([row])
    hf = reference(path)
    with torch.no_grad():
        hidden = loaded.model(batch.token_ids, batch.positions, PackedSequences(batch.lengths, batch.positions))
        packed = loaded.model.compute_logits(hidden)
        alone = torch.cat([hf(ids[None]).logits[0] for ids in batch.token_ids.split(batch.lengths)])
    assert (packed - alone).abs().max() < 1e-4


def test_eval_loss_equals_transformers_loss(tiny, tmp_path):
    path = tiny["qwen2"]
    loaded = load_model(str(path))
    examples = load_dataset(DATA / "sft_eval.jsonl", loaded.tokenizer, 128).examples
    trainer = LoraTrainer(loaded, TrainingConfig(tmp_path), examples, examples)  # a fresh adapter is a no-op
    total, count, hf = 0.0, 0, reference(path)
    with torch.no_grad():
        for e in examples:
            labels = torch.tensor(e.labels)
            n = int((labels[1:] != IGNORE_INDEX).sum())
            total += hf(torch.tensor([e.token_ids]), labels=labels[None]).loss.item() * n
            count += n
    assert trainer.evaluate() == pytest.approx(total / count, rel=1e-5)


def tune_args(path, out, *extra):
    return ["tune", "--model", str(path), "--data", str(DATA / "sft_train.jsonl"), "--out", str(out),
            "--max-length", "128", "--lr", "3e-3", "--no-progress", *extra]


def read_log(out):
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def test_tune_lowers_eval_loss_and_resumes_exactly(tiny, tmp_path, capsys):
    path = tiny["qwen2"]
    extra = ["--eval", str(DATA / "sft_eval.jsonl"), "--max-steps", "8", "--batch-size", "2", "--save-every", "4",
             "--warmup-steps", "2", "--dropout", "0.1", "--targets", "q,k,v,o,gate,up,down"]
    assert cli(tune_args(path, tmp_path / "run", *extra)) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    start, end = (float(x) for x in summary.split("eval loss ")[1].split(",")[0].split(" -> "))
    assert end < start - 0.3, summary
    full = read_log(tmp_path / "run")
    assert [h["step"] for h in full] == list(range(1, 9))
    assert full[0]["learning_rate"] == 0.0 and full[1]["learning_rate"] == pytest.approx(1.5e-3)  # warmup

    # Resume from step 4 in a fresh directory: steps 5..8 repeat the same losses and the same adapter.
    shutil.copytree(tmp_path / "run" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    assert cli(tune_args(path, tmp_path / "resumed", *extra, "--resume")) == 0
    resumed = read_log(tmp_path / "resumed")
    assert [h["step"] for h in resumed] == list(range(1, 9))
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full]
    a, b = load_file(tmp_path / "run" / "adapter_model.safetensors"), load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # The trained adapter is a plain peft adapter: same logits in peft.
    loaded = load_model(str(path))
    load_adapter(loaded.model, "t", tmp_path / "run")
    in_peft = peft.PeftModel.from_pretrained(reference(path), tmp_path / "run").eval()
    with torch.no_grad():
        assert (qwenkit_logits(loaded.model, adapter="t") - in_peft(IDS[None]).logits[0]).abs().max() < 1e-5


def test_two_torchrun_processes_equal_one(tiny, tmp_path):
    path = tiny["qwen2"]
    common = ["--max-steps", "3", "--batch-size", "1", "--dropout", "0", "--gradient-checkpointing"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "qwenkit.cli.main", *tune_args(path, tmp_path / "one", *common, "--grad-accum", "2")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "qwenkit.cli.main", *tune_args(path, tmp_path / "two", *common, "--grad-accum", "1")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert double.returncode == 0, double.stderr
    one, two = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert max(one[k].abs().max().item() for k in one if "lora_B" in k) > 1e-3  # it trained
    assert [h["loss"] for h in read_log(tmp_path / "one")] == pytest.approx([h["loss"] for h in read_log(tmp_path / "two")], rel=1e-5)


def test_bad_training_data_is_a_clear_error(tiny, tmp_path):
    path = tiny["qwen2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n')
    assert_one_line_error(run_cli(*tune_args(path, tmp_path / "out")[:3], "--data", str(bad), "--out", str(tmp_path / "o")),
                          "bad.jsonl:2", "not valid JSON")
    bad.write_text('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    assert_one_line_error(run_cli("tune", "--model", str(path), "--data", str(bad), "--out", str(tmp_path / "o")),
                          "record 1", "no assistant message")


@pytest.fixture(scope="module")
def two_adapters(tiny, tmp_path_factory):
    path = tiny["qwen2"]
    root = tmp_path_factory.mktemp("adapters")
    peft_model(reference(path), root / "attn", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model(reference(path), root / "mlp", target_modules=["gate_proj", "up_proj", "down_proj"])
    return path, root


LONG_PROMPTS = [" ".join(["the cat is on the mat"] * 6), "what is seven plus four? tell me the answer"]


def one_batch(engine, prompts, params, loras):
    """Every prompt with every adapter (None: the base) added at once, stepped to the end:
    (request id, adapter, prompt index, generated tokens) of each."""
    requests = [(engine.add_request(p, params, lora_name=lora), lora, i) for lora in loras for i, p in enumerate(prompts)]
    done = {}
    while engine.has_unfinished_requests():
        done.update({out.request_id: out.outputs[0].token_ids for out in engine.step() if out.finished})
    return [(request_id, lora, i, done[request_id]) for request_id, lora, i in requests]


def test_engine_batches_base_and_adapters_together(two_adapters):
    path, root = two_adapters
    llm = LLM(load_model(str(path)), engine_config=EngineConfig(max_num_seqs=16))
    llm.engine.add_lora("attn", root / "attn")
    llm.engine.add_lora("mlp", root / "mlp")
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    # Alone, each in its own fresh engine (no shared prefix cache to hide a mix-up).
    alone = {}
    for lora in (None, "attn", "mlp"):
        fresh = LLM(load_model(str(path)))
        if lora:
            fresh.engine.add_lora(lora, root / lora)
        alone[lora] = [o.outputs[0].token_ids for o in fresh.generate(LONG_PROMPTS, greedy, lora=lora)]
    assert alone["attn"] != alone[None] and alone["mlp"] != alone[None]
    # Base first, so its prompt blocks are in the prefix cache when the adapters' requests come.
    assert [o.outputs[0].token_ids for o in llm.generate(LONG_PROMPTS, greedy)] == alone[None]
    for request_id, lora, i, tokens in one_batch(llm.engine, LONG_PROMPTS, greedy, ("attn", None, "mlp")):
        assert tokens == alone[lora][i], lora
    with pytest.raises(QwenkitError, match="unknown LoRA adapter"):
        llm.engine.add_request("hi", greedy, lora_name="nope")


def test_adapters_with_prompt_lookup_speculation_decode_as_without(two_adapters):
    """Drafted tokens are verified with the request's adapter: base and both adapters in one batch,
    greedy and seeded, give the tokens each gives without speculation."""
    from test_speculative import drafting

    path, root = two_adapters
    loaded = load_model(str(path))
    plain, spec = LLM(loaded), drafting(LLM(loaded, engine_config=EngineConfig(speculative="ngram", num_speculative_tokens=4)))
    for llm in (plain, spec):
        llm.engine.add_lora("attn", root / "attn")
        llm.engine.add_lora("mlp", root / "mlp")
    prompts = [LONG_PROMPTS[0], " ".join(["one two three four"] * 8)]
    for params in (SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                   SamplingParams(temperature=0.9, seed=5, max_tokens=24, ignore_eos=True)):
        expected = {lora: [o.outputs[0].token_ids for o in plain.generate(prompts, params, lora=lora)] for lora in (None, "attn", "mlp")}
        for request_id, lora, i, tokens in one_batch(spec.engine, prompts, params, (None, "attn", "mlp")):
            assert tokens == expected[lora][i], (lora, i)
    assert spec.engine.speculator.stats.num_accepted_tokens > 10


def test_server_serves_adapters_by_model_name(two_adapters):
    path, root = two_adapters
    expected = LLM(load_model(str(path)))
    expected.engine.add_lora("attn", root / "attn")
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    server = ServerProcess("--model", str(path), "--served-model-name", "base", "--lora", f"attn={root / 'attn'}",
                           "--lora", f"mlp={root / 'mlp'}")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        cards = {m.id: m for m in client.models.list().data}
        assert set(cards) == {"base", "attn", "mlp"}
        for model, lora in (("base", None), ("attn", "attn")):
            reply = client.completions.create(model=model, prompt=LONG_PROMPTS[1], max_tokens=8, temperature=0,
                                              extra_body={"ignore_eos": True})
            want = expected.generate(LONG_PROMPTS[1], greedy, lora=lora)[0].outputs[0].text
            assert reply.model == model and reply.choices[0].text == want
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="hi", max_tokens=2)
    finally:
        server.stop()
