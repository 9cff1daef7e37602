"""The tiny NVFP4 Qwen3-VL-MoE checkpoint served by the e2e tests, with every file vLLM needs offline.

``write(dir)`` writes two twins from the same seed: ``legacy/`` (the bug report's
``experts.<proj>.<N>.*`` names) and ``canonical/`` (``experts.<N>.<proj>.*``), byte-identical tensors,
plus in both: a byte-level BPE ``tokenizer.json`` whose special tokens sit at the ids of
``checkpoints.TOKENS``, ``tokenizer_config.json`` with a chat template, the Qwen3-VL
``preprocessor_config.json`` / ``video_preprocessor_config.json`` and ``generation_config.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoints

SEED = 7
# special tokens by id (tests/checkpoints.TOKENS); everything below 1001 is byte-level BPE
SPECIAL = {
    checkpoints.TOKENS["image"]: "<|image_pad|>",
    checkpoints.TOKENS["video"]: "<|video_pad|>",
    checkpoints.TOKENS["vision_start"]: "<|vision_start|>",
    checkpoints.TOKENS["vision_end"]: "<|vision_end|>",
    checkpoints.TOKENS["bos"]: "<|im_start|>",
    checkpoints.TOKENS["eos"]: "<|im_end|>",
    1007: "<|endoftext|>",
}
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ text }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. A tiny model answers questions about images and videos.",
    "NVFP4 weights are packed two per byte; every block of sixteen values shares one FP8 scale.",
    "Hello, how are you today? Tell me a story about the sea, the mountains and the stars at night.",
    "vLLM serves models with an OpenAI compatible API: completions, chat completions and embeddings.",
    "def main():\n    print('hello world')\n    return 0\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000; punctuation , . ; : ! ? ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @",
]


def tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    vocab_size = min(SPECIAL) - 1  # BPE ids 0..999; id 1000 is a reserved filler
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fillers = [f"<|reserved_{i}|>" for i in range(tok.get_vocab_size(), min(SPECIAL))]
    tok.add_special_tokens(fillers + [SPECIAL[i] for i in sorted(SPECIAL)])
    for i, text in SPECIAL.items():
        assert tok.token_to_id(text) == i, (text, tok.token_to_id(text), i)
    assert tok.get_vocab_size() <= checkpoints.TINY["vocab"]
    return tok.to_str()


def tokenizer_config() -> dict[str, object]:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "chat_template": CHAT_TEMPLATE,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 4096,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
    }


def _vision(kind: str) -> dict[str, object]:
    # small image bounds keep vLLM's multimodal profiling cheap (<= 64x64 px -> <= 4 tokens each)
    cfg: dict[str, object] = {
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_rescale": True,
        "do_normalize": True,
        "do_resize": True,
        "do_convert_rgb": True,
        "processor_class": "Qwen3VLProcessor",
    }
    if kind == "image":
        cfg.update(image_processor_type="Qwen2VLImageProcessorFast", size={"shortest_edge": 1024, "longest_edge": 4096})
    else:
        cfg.update(
            video_processor_type="Qwen3VLVideoProcessor",
            size={"shortest_edge": 1024, "longest_edge": 8192},
            fps=2,
            min_frames=2,
            max_frames=4,
            do_sample_frames=True,
        )
    return cfg


def write_extras(path: Path, tokenizer: str) -> None:
    (path / "tokenizer.json").write_text(tokenizer)
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(_vision("image"), indent=2))
    (path / "video_preprocessor_config.json").write_text(json.dumps(_vision("video"), indent=2))
    eos = checkpoints.TOKENS["eos"]
    gen = {"bos_token_id": checkpoints.TOKENS["bos"], "eos_token_id": [eos], "pad_token_id": 1007, "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))


def write(root: Path) -> dict[str, Path]:
    """root/legacy and root/canonical: the same NVFP4 tensors under the two expert spellings; and
    root/legacy-mismatch: legacy, with up_proj of odd experts 30% larger than gate (gate/up global
    scales far apart, where harmonization shows); root/{legacy,canonical}-4-layers: 4 text layers,
    as pipeline parallelism needs."""
    tokenizer = tokenizer_json()
    out = {}
    variants = [
        ("legacy", "legacy", 1.0, None),
        ("canonical", "canonical", 1.0, None),
        ("legacy", "legacy-mismatch", 1.3, None),
        ("legacy", "legacy-4-layers", 1.0, {"layers": 4, "deepstack": [0, 1]}),  # pipeline parallel 2
        ("canonical", "canonical-4-layers", 1.0, {"layers": 4, "deepstack": [0, 1]}),
    ]
    for layout, name, mismatch, dims in variants:
        path = checkpoints.write(
            root / name, family="modelopt", layout=layout, seed=SEED, up_mismatch=mismatch, dims=dims
        )
        write_extras(path, tokenizer)
        out[name] = path
    return out


if __name__ == "__main__":
    for name, p in write(Path(sys.argv[1])).items():
        print(name, p)
