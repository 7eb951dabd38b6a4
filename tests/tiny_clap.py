"""A tiny randomly initialised CLAP model built from a config (no hub), for the agreement and
audio_caption tests: word-level tokenizer (RoBERTa-style special tokens), HTSAT audio tower, the
LAION feature extractor settings of an unfused model (48 kHz, 10 s windows, rand_trunc)."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "a an the of and with in on is are at by some someone person people voice voices man woman child "
    "speaks speaking talks talking sings singing says loud quiet calm slow fast soft tone tune melody "
    "music musical instrument piano guitar drum drums beat tempo upbeat song pure steady high low pitch "
    "sine tone beep hum buzz whistle noise silence silent room street car cars dog barks bird birds "
    "rain water wind engine speech male female adult clear recording echo there sound sounds hear "
    "heard plays playing playing background behind while then"
).split()


def save_tiny_clap(folder: Path, *, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, PreTrainedTokenizerFast

    from stages.audio_tags import audio_labels

    vocab = ["<s>", "<pad>", "</s>", "<unk>"]
    for line in [*audio_labels(), *WORDS]:
        for w in line.lower().replace(",", " ").replace("(", " ").replace(")", " ").split():
            if w not in vocab:
                vocab.append(w)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=48,
    )  # fmt: skip
    text = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
        projection_dim=16,
    )  # fmt: skip
    audio = dict(
        patch_embeds_hidden_size=8, hidden_size=64, depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 2, 2],
        projection_dim=16, enable_fusion=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=16))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad").save_pretrained(folder)
    return folder
