"""The seed package's quick start, as the README shows it, from phase 1 to trained captions; and what a new
user meets around it: offline hub names, local folders, the device, decoder folders that cannot caption."""
import re
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import core
import data
import encoders
import llm_integration as L
from encoders import create_encoder, minilm_path

README = Path(__file__).resolve().parents[1] / "README.md"
OFFLINE_NAMES = {"openai/clip-vit-base-patch32": "synth-vision", "Qwen/Qwen2.5-1.5B-Instruct": "synthtouch-qwen2-tiny"}


def quick_start_code() -> str:
    section = README.read_text().split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quick_start_runs_verbatim_to_trained_captions(tmp_path):
    from PIL import Image
    synth = data.SynthTouch(64, seed=3)
    image_paths = []
    for i in range(len(synth)):
        path = tmp_path / f"image_{i}.png"
        Image.fromarray((synth[i]["vision"].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
        image_paths.append(str(path))
    code = quick_start_code()
    for hub_name, offline_name in OFFLINE_NAMES.items():
        assert f'"{hub_name}"' in code
        code = code.replace(f'"{hub_name}"', f'"{offline_name}"')
    scope = {"image_paths": image_paths, "captions": synth.captions}
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        exec(compile(code, "README.md quick start", "exec"), scope)
    assert not [w for w in said if "never trained" in str(w.message)]  # it trains before it captions

    assert next(scope["model"].parameters()).device.type == scope["cfg"].device.type  # cfg.device is honoured
    history = scope["history"]
    assert len(history["loss"]) == 3 and history["loss"][-1] < history["loss"][0]
    caption_losses = [r["train loss"] for r in scope["caption_history"] if r["kind"] == "epoch"]
    assert len(caption_losses) == 3 and caption_losses[-1] < caption_losses[0]
    caption = scope["caption"]
    assert isinstance(caption, list) and len(caption) == 1 and caption[0].strip()


def test_offline_hub_name_fails_fast_and_says_what_to_pass(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached, whatever this machine holds
    cfg = core.AlignmentConfig(vision_model_name="openai/clip-vit-base-patch32")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"not in the Hugging Face cache.*vision_model_name.*local folder"
                                                r".*\['synth-vision'\]"):
        core.VisionTextAligner(cfg)
    assert time.perf_counter() - start < 10  # download retries took a minute; the check itself is instant


def test_local_sentence_transformers_folder_is_a_text_model_name():
    folder = minilm_path()  # a saved sentence-transformers model, as `SentenceTransformer.save(DIR)` writes
    by_folder = core.VisionTextAligner(core.AlignmentConfig(vision_model_name="synth-vision", text_model_name=folder))
    by_name = create_encoder("all-MiniLM-L6-v2")
    captions = ["rough, hard, red", "smooth, soft, blue"]
    # the same weights and the same operations in the same order: only float noise may differ
    torch.testing.assert_close(by_folder.encoders["text"](captions).pooled, by_name(captions).pooled,
                               atol=1e-5, rtol=1e-5)


def test_local_open_clip_folder_is_a_vision_model_name(tmp_path):
    """The layout `huggingface-cli download <open_clip repo> --local-dir DIR` writes: config + weights."""
    import json
    import open_clip
    reference = create_encoder("synth-vision", init_seed=7)
    model_cfg = open_clip.get_model_config(reference.cfg.model_name)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    clip = open_clip.create_model(reference.cfg.model_name)
    clip.visual.load_state_dict(reference.net.state_dict())
    torch.save(clip.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    model = core.VisionTextAligner(core.AlignmentConfig(vision_model_name=str(tmp_path), text_model_name="minilm"))
    images = torch.rand(2, 3, 64, 64)
    # the same weights and the same operations: only float noise may differ
    torch.testing.assert_close(model.encoders["vision"](images).pooled, reference(images).pooled, atol=1e-5, rtol=1e-5)


def test_config_device_moves_the_model():
    model = core.VisionTextAligner(core.AlignmentConfig(vision_model_name="synth-vision", text_model_name="minilm",
                                                        d_align=32, hidden_dim=32, device="meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert core.get_device().type in ("cuda", "mps", "cpu")


# ----------------------------------------------------------------------------------------------
# decoder folders a user built

def qwen2_folder(folder, tokenizer, vocab_size=None):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=vocab_size or len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_tokenizer_that_cannot_write_the_prompt_fails_on_load(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "<pad>": 1, "<eos>": 2, "a": 3, "handwritten": 4}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="<pad>", eos_token="<eos>")
    folder = qwen2_folder(tmp_path / "words", tokenizer)
    with pytest.raises(ValueError, match=r"does not write text back: 'Describe this image:'"):
        L.load_decoder(folder)


def test_a_special_token_outside_the_embedding_fails_on_load(tmp_path):
    tokenizer = L.build_caption_tokenizer(data.SynthTouch(64).captions, vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    folder = qwen2_folder(tmp_path / "short", tokenizer, vocab_size=len(tokenizer) - 1)
    with pytest.raises(ValueError, match=r"special tokens \{'<\|extra\|>': \d+\} outside the decoder's embedding"):
        L.load_decoder(folder)


def test_a_random_decoder_left_frozen_is_warned_about(tmp_path):
    texts = data.SynthTouch(64).captions + list(L.PROMPTS)
    folder = str(L.save_tiny_decoder(tmp_path / "random", texts, vocab_size=300, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    aligner = core.VisionTextAligner(core.AlignmentConfig(vision_model_name="synth-vision", text_model_name="minilm",
                                                          d_align=32, hidden_dim=32))
    with pytest.warns(UserWarning, match="looks randomly initialised.*train_decoder='full'"):
        L.MultimodalLLM(aligner, L.LLMConfig(model_name=folder))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.MultimodalLLM(aligner, L.LLMConfig(model_name=folder, train_decoder="full"))


def test_the_python_defaults_are_the_shipped_phase_2_config():
    """The quick start's LLMConfig() trains what llm_integration.py trains: configs/phase2.yaml gives no value of its
    own (only the story of how LLMConfig's defaults were chosen), so the two cannot drift apart."""
    assert yaml.safe_load(L.DEFAULT_CONFIG.read_text()) is None
    assert L.load_llm_config(None) == L.LLMConfig()
    assert (L.LLMConfig().lr, L.LLMConfig().projector, L.LLMConfig().standardize_tokens) == (1e-3, "mlp2x_gelu", "whiten")


def test_random_testbed_encoder_is_said_once_in_plain_words(monkeypatch, capsys, caplog):
    monkeypatch.setattr(encoders, "_RANDOM_INIT_NOTED", set())
    for _ in range(2):
        create_encoder("synth-vision")
    assert capsys.readouterr().out.count("random weights (pretrained=None), as intended") == 1
    assert not [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]
