"""Gemma 3n on a real ingested dataset: examples, generation, LoRA fine-tuning, errors.

Everything runs the tiny randomly initialised model on the CPU. The fine-tuning
tests teach it a different answer for CT and MR series under the same prompt, so
the answer can only come from the pixels.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from ingest_helpers import ingest_folder
from PIL import Image

from workbench.audit import open_audit_log
from workbench.dataset.reader import DatasetView
from workbench.errors import ConfigurationError, DatasetError
from workbench.gemma import (
    GemmaError,
    check_image_tokens,
    encode_prompt,
    generate_text,
    load_gemma,
    lora_target_modules,
    run_gemma_finetune,
    run_gemma_inference,
    target_losses,
)
from workbench.loaders.gemma import (
    gemma_examples,
    representative_slices,
    window_to_uint8,
)
from workbench.samples import generate_studies

TEMPLATE = "Modality: {Modality}. Body part: {BodyPartExamined}. Describe the image."
SAME_PROMPT = "Describe the image."
TARGETS = {"CT": "axial computed tomography", "MR": "sagittal magnetic resonance"}
CT_SLICES = 6
MR_SLICES = 4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run the tiny model on one thread: it gains nothing from more, and on a busy
    2-core machine waiting threads made training steps 10 to 20 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Return an ingested dataset of 2 patients: 2 CT and 2 MR series."""
    root = tmp_path_factory.mktemp("gemma")
    corpus = generate_studies(
        root / "corpus",
        patients=2,
        studies_per_patient=1,
        ct_slices=CT_SLICES,
        mr_slices=MR_SLICES,
        rows=48,
        columns=48,
    )
    ingest_folder(corpus.root, root / "dataset")
    return root / "dataset"


@pytest.fixture(scope="module")
def modality_reports(dataset, tmp_path_factory):
    """Return a reports CSV giving each series its modality's target text."""
    stacks = DatasetView.open(dataset).volumes()
    reports = pd.DataFrame(
        {
            "SeriesInstanceUID": stacks["SeriesInstanceUID"],
            "report": [TARGETS[m] for m in stacks["Modality"]],
        }
    )
    path = tmp_path_factory.mktemp("reports") / "reports.csv"
    reports.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def finetuned(dataset, modality_reports, tmp_path_factory):
    """Fine-tune the tiny model on CT vs MR targets; return summary, folder, model."""
    out = tmp_path_factory.mktemp("finetune")
    gemma = load_gemma("tiny", device="cpu")
    summary = run_gemma_finetune(
        dataset,
        gemma,
        out,
        purpose="gemma fine-tuning test",
        prompt_template=SAME_PROMPT,
        reports=modality_reports,
        steps=60,
        learning_rate=1e-2,
        lora_rank=8,
        seed=0,
    )
    return summary, out, gemma


@pytest.fixture(scope="module")
def tiny():
    return load_gemma("tiny", device="cpu")


def image_of(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


# Examples


def test_representative_slices():
    assert representative_slices(6, 1) == [3]
    assert representative_slices(6, 3) == [1, 3, 5]
    assert representative_slices(4, 3) == [0, 2, 3]
    assert representative_slices(2, 5) == [0, 1]
    with pytest.raises(ConfigurationError, match="slices must be 1 or more"):
        representative_slices(4, 0)


def test_window_to_uint8():
    hounsfield = np.array([-1000.0, -160.0, 40.0, 240.0, 700.0])
    np.testing.assert_array_equal(
        window_to_uint8(hounsfield, 40.0, 400.0), [0, 0, 128, 255, 255]
    )
    np.testing.assert_array_equal(
        window_to_uint8(hounsfield, 40.0, 400.0, invert=True), [255, 255, 127, 0, 0]
    )
    with pytest.raises(ConfigurationError, match="window width must be positive"):
        window_to_uint8(hounsfield, 40.0, 0.0)


@pytest.mark.slow
def test_examples_prompts_images_and_audit(dataset):
    examples = gemma_examples(
        dataset, purpose="gemma examples test", prompt_template=TEMPLATE
    )
    assert len(examples) == 4
    stacks = DatasetView.open(dataset).volumes()
    assert {e.SeriesInstanceUID for e in examples} == set(stacks["SeriesInstanceUID"])
    prompts = sorted(e.prompt for e in examples)
    assert prompts[0] == "Modality: CT. Body part: CHEST. Describe the image."
    assert prompts[-1].startswith("Modality: MR.")
    for example in examples:
        assert len(example.images) == 1
        assert example.images[0].mode == "RGB"
        assert example.images[0].size == (48, 48)
        assert example.target is None
    ct = [e for e in examples if e.metadata["Modality"] == "CT"]
    assert [e.slice_indices for e in ct] == [[CT_SLICES // 2]] * 2
    # The CT series carry WindowCenter 40 and WindowWidth 400: air is black, the
    # body (40 HU) mid grey.
    pixels = np.asarray(ct[0].images[0])[..., 0]
    assert pixels[0, 0] == 0
    assert abs(int(pixels[24, 8]) - 128) <= 4

    with open_audit_log() as audit:
        record = audit.records(action="dataset.read")[-1]
    assert record.purpose == "gemma examples test"
    assert record.resource == "dataset:dataset"
    assert record.details["examples"] == 4
    assert record.details["loader"] == "gemma"


@pytest.mark.slow
def test_examples_slices_window_and_where(dataset):
    examples = gemma_examples(
        dataset,
        purpose="gemma examples test",
        prompt_template="{slices} slices",
        slices=3,
        window="lung",
        image_size=32,
        where={"Modality": "CT"},
    )
    assert len(examples) == 2
    for example in examples:
        assert example.prompt == f"{CT_SLICES} slices"
        assert example.slice_indices == [1, 3, 5]
        assert [image.size for image in example.images] == [(32, 32)] * 3
    # In the lung window (-600/1500), body at 40 HU is light grey, not white.
    explicit = gemma_examples(
        dataset,
        purpose="gemma examples test",
        prompt_template="x",
        window=(-600, 1500),
        where={"Modality": "CT"},
    )
    lung = gemma_examples(
        dataset,
        purpose="gemma examples test",
        prompt_template="x",
        window="lung",
        where={"Modality": "CT"},
    )
    body = np.asarray(lung[0].images[0])[24, 8, 0]
    assert 230 <= body <= 242
    assert explicit[0].images[0].tobytes() == lung[0].images[0].tobytes()


@pytest.mark.slow
def test_examples_targets_from_reports(dataset, tmp_path):
    stacks = DatasetView.open(dataset).volumes()
    reports = pd.DataFrame(
        {
            "SeriesInstanceUID": stacks["SeriesInstanceUID"][:3],
            "findings": ["one", "two", "three"],
        }
    )
    path = tmp_path / "reports.parquet"
    reports.to_parquet(path)
    examples = gemma_examples(
        dataset,
        purpose="gemma examples test",
        prompt_template=SAME_PROMPT,
        reports=path,
        target_column="findings",
    )
    targets = {e.SeriesInstanceUID: e.target for e in examples}
    assert [targets[uid] for uid in stacks["SeriesInstanceUID"]] == [
        "one",
        "two",
        "three",
        None,
    ]
    by_column = gemma_examples(
        dataset,
        purpose="gemma examples test",
        prompt_template=SAME_PROMPT,
        target_column="Modality",
    )
    assert sorted(e.target for e in by_column) == ["CT", "CT", "MR", "MR"]

    repeated = pd.concat([reports, reports])
    with pytest.raises(ConfigurationError, match="3 repeated SeriesInstanceUID"):
        gemma_examples(
            dataset,
            purpose="gemma examples test",
            prompt_template=SAME_PROMPT,
            reports=repeated,
            target_column="findings",
        )
    with pytest.raises(ConfigurationError, match="no 'report' column"):
        gemma_examples(
            dataset,
            purpose="gemma examples test",
            prompt_template=SAME_PROMPT,
            reports=reports,
        )


@pytest.mark.slow
def test_examples_invalid_requests(dataset):
    with pytest.raises(ConfigurationError, match="PatientMood"):
        gemma_examples(
            dataset,
            purpose="gemma examples test",
            prompt_template="Mood: {PatientMood}. Modality: {Modality}.",
        )
    with pytest.raises(ConfigurationError, match="where names column"):
        gemma_examples(
            dataset,
            purpose="gemma examples test",
            prompt_template=SAME_PROMPT,
            where={"Scanner": "X"},
        )
    with pytest.raises(ConfigurationError, match="unknown window 'liver'"):
        gemma_examples(
            dataset,
            purpose="gemma examples test",
            prompt_template=SAME_PROMPT,
            window="liver",
        )
    with pytest.raises(ConfigurationError, match="purpose is required"):
        gemma_examples(dataset, purpose=" ", prompt_template=SAME_PROMPT)
    with pytest.raises(DatasetError, match="no pixel stack"):
        gemma_examples(
            dataset,
            purpose="gemma examples test",
            prompt_template=SAME_PROMPT,
            where={"Modality": "US"},
        )


# Inference


@pytest.mark.slow
def test_inference_text_for_each_series(dataset, tiny, tmp_path):
    summary = run_gemma_inference(
        dataset, tiny, TEMPLATE, tmp_path, purpose="gemma inference test"
    )
    generations = pd.read_parquet(tmp_path / "generations.parquet")
    stacks = DatasetView.open(dataset).volumes()
    assert summary["examples"] == 4
    assert sorted(generations["SeriesInstanceUID"]) == sorted(
        stacks["SeriesInstanceUID"]
    )
    for row in generations.itertuples():
        assert row.text.strip() != ""
        assert row.model == "tiny"
        assert row.seconds > 0
        assert row.prompt.startswith("Modality: ")
    with open_audit_log() as audit:
        record = audit.records(action="dataset.read")[-1]
    assert record.purpose == "gemma inference test"


def test_generation_rejects_nan_logits():
    gemma = load_gemma("tiny", device="cpu")
    with torch.no_grad():
        gemma.model.model.language_model.norm.weight.fill_(float("nan"))
    with pytest.raises(GemmaError, match="NaN or infinite logits"):
        generate_text(gemma, SAME_PROMPT, [image_of(0)], max_new_tokens=2)


def test_generation_rejects_empty_text():
    gemma = load_gemma("tiny", device="cpu")
    # A zero final norm makes every logit 0. Greedy decoding then takes the lowest
    # id not suppressed: <unk> first (EOS is barred from the first step), then
    # EOS. Decoding drops both, so the text is empty.
    with torch.no_grad():
        gemma.model.model.language_model.norm.weight.zero_()
    with pytest.raises(GemmaError, match="generated no text"):
        generate_text(gemma, SAME_PROMPT, [image_of(0)], max_new_tokens=3)


def test_chat_template_prompt_has_one_bos(tiny):
    processor = tiny.processor
    processor.chat_template = (
        "{{ bos_token }}{% for message in messages %}<start_of_turn>"
        "{{ message['role'] }}\n{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}<image_soft_token>"
        "{% else %}{{ item['text'] }}{% endif %}{% endfor %}<end_of_turn>\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    try:
        batch = encode_prompt(tiny, SAME_PROMPT, [image_of(1), image_of(2)])
        text, _ = generate_text(tiny, SAME_PROMPT, [image_of(1)], max_new_tokens=4)
    finally:
        processor.chat_template = None
    ids = batch["input_ids"][0].tolist()
    assert ids.count(processor.tokenizer.bos_token_id) == 1
    assert ids[0] == processor.tokenizer.bos_token_id
    assert ids.count(tiny.image_token_id) == 2 * tiny.image_seq_length
    assert text != ""


# Fine-tuning


def test_lora_targets_only_decoder_attention(tiny):
    names = lora_target_modules(tiny.model)
    assert len(names) == 12
    for name in names:
        assert name.startswith("model.language_model.layers.")
        assert name.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "o_proj"}
    audio_projections = [
        name
        for name, _ in tiny.model.named_modules()
        if name.startswith("model.audio_tower") and name.endswith("q_proj")
    ]
    assert audio_projections
    assert not set(audio_projections) & set(names)


@pytest.mark.slow
def test_finetune_lowers_loss(finetuned):
    summary, out, _ = finetuned
    losses = pd.read_csv(out / "loss.csv")
    assert list(losses["step"]) == list(range(1, 61))
    assert losses["loss"].notna().all()
    assert losses["loss"].iloc[-5:].mean() < losses["loss"].iloc[:5].mean() - 0.3
    assert summary["loss_end"] < summary["loss_start"]
    assert summary["loss_last"] < summary["loss_first"]
    assert summary["examples"] == 4
    # rank 8 on 12 projections of width 64: (64 + out) * 8 each.
    assert summary["trainable_parameters"] == 11264
    assert len(summary["target_modules"]) == 12
    for name in summary["target_modules"]:
        assert ".language_model." in name
        assert "vision" not in name
        assert "audio" not in name
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "finetune.json").read_text())["steps"] == 60


@pytest.mark.slow
def test_finetune_answer_depends_on_image(finetuned, dataset):
    _, out, trained = finetuned
    reloaded = load_gemma("tiny", device="cpu", adapter=out / "adapter")
    examples = gemma_examples(
        dataset, purpose="gemma fine-tuning test", prompt_template=SAME_PROMPT
    )
    stacks = DatasetView.open(dataset).volumes()
    modality = dict(zip(stacks["volume_path"], stacks["Modality"], strict=True))
    candidates = [TARGETS["CT"], TARGETS["MR"]]
    for example in examples:
        expected = TARGETS[modality[example.volume_path]]
        answer, _ = generate_text(reloaded, example.prompt, example.images)
        assert answer == expected
        losses = target_losses(reloaded, example.prompt, example.images, candidates)
        assert candidates[int(np.argmin(losses))] == expected
    # The adapter reloaded onto a fresh base model equals the trained model.
    batch = encode_prompt(trained, SAME_PROMPT, examples[0].images)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.model(**batch).logits, trained.model(**batch).logits
        )


@pytest.mark.slow
def test_finetune_rejects_nan_loss(dataset, modality_reports, tmp_path):
    gemma = load_gemma("tiny", device="cpu")
    with torch.no_grad():
        gemma.model.model.language_model.norm.weight.fill_(float("nan"))
    with pytest.raises(GemmaError, match="training loss is nan at step 1"):
        run_gemma_finetune(
            dataset,
            gemma,
            tmp_path,
            purpose="gemma fine-tuning test",
            prompt_template=SAME_PROMPT,
            reports=modality_reports,
            steps=2,
        )


# Model loading and input checks


def test_checkpoint_folder_gives_same_logits(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    loaded = load_gemma(tmp_path, device="cpu")
    assert loaded.spec == str(tmp_path.resolve())
    images = [image_of(3)]
    batch = encode_prompt(tiny, TEMPLATE, images)
    batch_loaded = encode_prompt(loaded, TEMPLATE, images)
    assert torch.equal(batch["input_ids"], batch_loaded["input_ids"])
    with torch.no_grad():
        assert torch.equal(
            tiny.model(**batch).logits, loaded.model(**batch_loaded).logits
        )


def test_tiny_model_is_deterministic():
    first = load_gemma("tiny", device="cpu", seed=7)
    second = load_gemma("tiny", device="cpu", seed=7)
    other = load_gemma("tiny", device="cpu", seed=8)
    weights = dict(first.model.named_parameters())
    for name, parameter in second.model.named_parameters():
        assert torch.equal(parameter, weights[name]), name
    name = "model.language_model.embed_tokens.weight"
    assert not torch.equal(dict(other.model.named_parameters())[name], weights[name])


def test_float16_rejected():
    with pytest.raises(ConfigurationError, match="float16"):
        load_gemma("tiny", device="cpu", dtype="float16")
    with pytest.raises(ConfigurationError, match="float16"):
        load_gemma("tiny", device="cpu", dtype=torch.float16)
    with pytest.raises(ConfigurationError, match="invalid dtype 'int8'"):
        load_gemma("tiny", device="cpu", dtype="int8")


def test_hub_name_and_missing_folder_rejected(tmp_path):
    with pytest.raises(ConfigurationError, match="never downloads"):
        load_gemma("google/gemma-3n-E2B-it", device="cpu")
    with pytest.raises(ConfigurationError, match="neither 'tiny' nor an existing"):
        load_gemma(tmp_path / "absent", device="cpu")
    with pytest.raises(ConfigurationError, match=r"has no config\.json"):
        load_gemma(tmp_path, device="cpu")


def test_image_token_mismatch_detected(tiny):
    batch = encode_prompt(tiny, SAME_PROMPT, [image_of(4)])
    check_image_tokens(batch, tiny, [1])
    with pytest.raises(GemmaError, match="need 32"):
        check_image_tokens(batch, tiny, [2])
    tampered = dict(batch)
    ids = batch["input_ids"].clone()
    first = int((ids[0] == tiny.image_token_id).nonzero()[0])
    ids[0, first] = tiny.processor.tokenizer.pad_token_id
    tampered["input_ids"] = ids
    with pytest.raises(GemmaError, match="contains 15 image tokens"):
        check_image_tokens(tampered, tiny, [1])


def test_processor_image_length_mismatch_rejected(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    config_path = tmp_path / "processor_config.json"
    settings = json.loads(config_path.read_text())
    settings["image_seq_length"] = 8
    config_path.write_text(json.dumps(settings))
    with pytest.raises(GemmaError, match="puts 8 image tokens per image"):
        load_gemma(tmp_path, device="cpu")
