"""Fine-tuning from an MLM checkpoint: GLUE and CoNLL readers, word-piece alignment, entity spans and scores,
layer-wise lr decay, and tiny models that learn generated GLUE-format and CoNLL-format tasks."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import pytest
import torch

from cli import main
from datamodules.text.conll_datamodule import (
    IGNORE_INDEX,
    CoNLLDataModule,
    NERCollator,
    encode_words,
    read_conll,
)
from datamodules.text.glue_datamodule import GLUE_TASKS, encode_texts, load_tokenizer, read_glue_tsv
from datamodules.tokenizer import TextTokenizer
from lightning_modules.components.bert_finetune import mlm_bert_config
from lightning_modules.components.hf_interop import save_hf_bert
from lightning_modules.components.ner_metrics import EntityF1, entity_spans
from lightning_modules.finetune_module import SequenceClassificationModule, TokenClassificationModule
from lightning_modules.mlm_module import MLMPretrainingModule
from lightning_modules.training.llrd import llrd_param_groups
from tests.helpers import CONFIGS, REPO, cli_args, quiet_trainer

REAL = REPO.parent / "shared/data/real"


# generated tasks -------------------------------------------------------------------------------------------
POSITIVE = ["great", "superb", "delightful", "wonderful", "brilliant", "charming"]
NEGATIVE = ["awful", "dreadful", "boring", "terrible", "clumsy", "tedious"]
FILLER = [
    "the",
    "film",
    "movie",
    "plot",
    "actors",
    "story",
    "was",
    "is",
    "and",
    "a",
    "with",
    "scenes",
    "ending",
    "cast",
    "music",
    "quite",
    "really",
    "very",
]
DISTRACTORS = [
    "long",
    "loud",
    "green",
    "old",
    "new",
    "french",
    "slow",
    "bright",
]  # adjectives that say nothing
TOPICS = ["river", "castle", "market", "forest", "harbour", "valley"]
NAMES = ["smith", "jones", "okafor", "lindqvist", "moreau", "tanaka", "kowalski", "brennan"]
FIRST_NAMES = ["john", "maria", "kenji", "ada"]
CITIES = ["paris", "lagos", "osaka", "lima", "oslo", "quito"]


def _filler(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(FILLER + DISTRACTORS) for _ in range(n)]


def sentiment_rows(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Label 1 iff the sentence holds a positive word; 40% positive, so the majority class scores 0.6."""
    rows = []
    for _ in range(n):
        label = int(rng.random() < 0.4)
        words = _filler(rng, rng.randint(4, 9))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append((" ".join(words), str(label)))
    return rows


def pair_rows(rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """Label 1 iff a topic word is in the second sentence rather than the first (40%): the same words in
    either order, so only the segment ids and [SEP] of the pair encoding tell the classes apart."""
    rows = []
    for _ in range(n):
        label = int(rng.random() < 0.4)
        s1, s2 = _filler(rng, rng.randint(3, 6)), _filler(rng, rng.randint(3, 6))
        with_topic = s2 if label else s1
        with_topic.insert(rng.randrange(len(with_topic) + 1), rng.choice(TOPICS))
        rows.append((str(label), " ".join(s1), " ".join(s2)))
    return rows


def ner_sentences(rng: random.Random, n: int) -> list[list[tuple[str, str]]]:
    """`mr` + a (first and) last name is PER, a city is LOC; IOB1 tags as in the original CoNLL-2003 files."""
    out = []
    for _ in range(n):
        words = [(w, "O") for w in _filler(rng, rng.randint(2, 6))]
        for _ in range(rng.randint(1, 2)):
            if rng.random() < 0.5:
                name = ([rng.choice(FIRST_NAMES)] if rng.random() < 0.5 else []) + [
                    rng.choice(NAMES).capitalize()
                ]
                span = [("mr", "O")] + [(w, "I-PER") for w in name]
            else:
                span = [("in", "O"), (rng.choice(CITIES).capitalize(), "I-LOC")]
            at = rng.randrange(len(words) + 1)
            words[at:at] = span
        out.append(words)
    return out


def write_sst2(folder: Path, seed: int = 0) -> float:
    """train.tsv / dev.tsv as distributed (header `sentence\\tlabel`); returns the dev majority-class accuracy."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    dev = []
    for split, n in (("train", 640), ("dev", 200)):
        rows = sentiment_rows(rng, n)
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
        dev = rows
    test = sentiment_rows(rng, 20)  # unlabelled, with an index column, as distributed
    (folder / "test.tsv").write_text(
        "index\tsentence\n" + "".join(f"{i}\t{s}\n" for i, (s, _) in enumerate(test))
    )
    ones = sum(y == "1" for _, y in dev) / len(dev)
    return max(ones, 1 - ones)


def write_mrpc(folder: Path, seed: int = 1) -> float:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    dev = []
    for split, n in (("train", 640), ("dev", 200)):
        rows = pair_rows(rng, n)
        text = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        text += "".join(f"{y}\t{2 * i}\t{2 * i + 1}\t{a}\t{b}\n" for i, (y, a, b) in enumerate(rows))
        (folder / f"{split}.tsv").write_text(text)
        dev = rows
    ones = sum(y == "1" for y, _, _ in dev) / len(dev)
    return max(ones, 1 - ones)


def write_conll(folder: Path, seed: int = 2) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.txt", 480), ("valid.txt", 120)):
        lines = ["-DOCSTART- -X- -X- O", ""]
        for sentence in ner_sentences(rng, n):
            lines += [f"{w} NN I-NP {t}" for w, t in sentence] + [""]
        (folder / name).write_text("\n".join(lines).rstrip("\n"))  # no final newline


pytestmark = pytest.mark.usefixtures(
    "one_thread_module"
)  # tiny models: one thread (tests/helpers.single_thread)


@pytest.fixture(scope="module")
def mlm_ckpt(tmp_path_factory) -> Path:
    """A tiny MLM checkpoint of this framework (2 steps), with a WordPiece vocabulary trained on the task texts."""
    rng = random.Random(3)
    texts = [s for s, _ in sentiment_rows(rng, 300)]
    texts += [f"{a} {b}" for _, a, b in pair_rows(rng, 300)]
    texts += [" ".join(w for w, _ in s) for s in ner_sentences(rng, 300)]
    tokenizer = TextTokenizer.train(texts, vocab_size=150, min_frequency=1)  # small: names split into pieces
    folder = tmp_path_factory.mktemp("mlm")

    class Data(L.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.tokenizer = tokenizer

        def train_dataloader(self):
            batch = tokenizer(texts[:8], max_length=32)
            labels = torch.where(batch["attention_mask"], batch["input_ids"], IGNORE_INDEX)
            return torch.utils.data.DataLoader([{**batch, "labels": labels}] * 2, batch_size=None)

    L.seed_everything(0)
    model = MLMPretrainingModule(
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=64,
        encoder={"size": "tiny"},
        optimizer={"warmup_steps": 0},
    )
    trainer = quiet_trainer(
        max_steps=2,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_last=True)],
    )
    trainer.fit(model, datamodule=Data())
    return folder / "last.ckpt"


def _finetune(command: str, config: str, ckpt: Path, data: Path, root: Path, *extra: str) -> list[str]:
    """`cli.py <command>` of configs/finetune/<config> from the MLM checkpoint `ckpt` on the task files in `data`."""
    return cli_args(
        command,
        f"--model.init_ckpt={ckpt}",
        f"--data.root={data}",
        "--trainer.log_every_n_steps=5",
        *extra,
        config=f"finetune/{config}",
        root=root,
    )


# learning --------------------------------------------------------------------------------------------------
def test_sst2_like_task_learns_from_mlm_checkpoint(mlm_ckpt: Path, tmp_path: Path) -> None:
    majority = write_sst2(tmp_path / "SST-2")
    task = ("sst2.yaml", mlm_ckpt, tmp_path / "SST-2", tmp_path / "run", "--model.optimizer.lr=1e-3")
    cli = main(_finetune("fit", *task, "--trainer.max_epochs=3", "--data.loader.batch_size=32"))
    acc = float(cli.trainer.callback_metrics["val/acc"])
    print(f"SST-2-like dev accuracy {acc:.3f}, majority class {majority:.3f}")
    assert acc >= majority + 0.25
    assert 0.0 < float(cli.trainer.callback_metrics["val/f1"]) <= 1.0
    # the test stage scores dev.tsv (GLUE test files have no labels) with the best checkpoint
    best = cli.trainer.checkpoint_callback.best_model_path
    cli = main(_finetune("test", *task, f"--ckpt_path={best}"))
    assert float(cli.trainer.callback_metrics["test/acc"]) >= majority + 0.25
    # predict runs on test.tsv; predictions keep the file's index. The fine-tuned checkpoint holds the tokenizer.
    cli = main(_finetune("predict", *task, f"--ckpt_path={best}", f"--data.tokenizer.path={best}"))
    out = cli.trainer.predict_loop.predictions
    index = torch.cat([b["index"] for b in out]).tolist()
    predicted = torch.cat([b["prediction"] for b in out]).tolist()
    rows = (tmp_path / "SST-2/test.tsv").read_text().splitlines()[1:]
    truth = [int(any(w in POSITIVE for w in row.split("\t")[1].split())) for row in rows]
    assert index == list(range(len(rows)))
    assert sum(p == t for p, t in zip(predicted, truth)) >= 0.8 * len(rows)


@pytest.mark.slow  # about 5 s; the SST-2-like and CoNLL-like learning tests stay in the default run
def test_mrpc_like_pair_task_learns(mlm_ckpt: Path, tmp_path: Path) -> None:
    majority = write_mrpc(tmp_path / "MRPC")
    cli = main(
        _finetune(
            "fit",
            "mrpc.yaml",
            mlm_ckpt,
            tmp_path / "MRPC",
            tmp_path / "run",
            "--model.optimizer.lr=1e-3",
            "--trainer.max_epochs=4",
            "--data.loader.batch_size=32",
            "--model.optimizer.layer_decay=0.8",
        )
    )
    acc = float(cli.trainer.callback_metrics["val/acc"])
    print(f"MRPC-like dev accuracy {acc:.3f}, majority class {majority:.3f}")
    assert acc >= majority + 0.2
    # with layer decay on: embeddings, 2 blocks and the head (pooler included) each at their own peak lr
    peaks = sorted({round(g["initial_lr"], 12) for g in cli.trainer.optimizers[0].param_groups})
    assert peaks == [round(1e-3 * 0.8**k, 12) for k in (3, 2, 1, 0)]


def test_conll_like_ner_learns(mlm_ckpt: Path, tmp_path: Path) -> None:
    write_conll(tmp_path / "conll")
    task = ("conll2003.yaml", mlm_ckpt, tmp_path / "conll", tmp_path / "run", "--model.optimizer.lr=1e-3")
    cli = main(_finetune("fit", *task, "--trainer.max_epochs=4", "--data.loader.batch_size=32"))
    m = cli.trainer.callback_metrics
    print({k: round(float(v), 3) for k, v in m.items() if k.startswith("val/")})
    # all-O scores 0; the generated entities are easy once learned
    assert float(m["val/f1"]) >= 0.8
    assert float(m["val/f1_PER"]) > 0.6 and float(m["val/f1_LOC"]) > 0.6


# checkpoint and tokenizer loading --------------------------------------------------------------------------
def test_init_ckpt_loads_the_encoder_and_its_tokenizer(mlm_ckpt: Path) -> None:
    ckpt = torch.load(mlm_ckpt, map_location="cpu", weights_only=True)
    tokenizer = load_tokenizer(mlm_ckpt)
    assert tokenizer.tokenizer.to_str() == ckpt["tokenizer_json"]
    module = SequenceClassificationModule(
        num_labels=3, init_ckpt=str(mlm_ckpt), vocab_size=tokenizer.vocab_size
    )
    assert module.model.bert.cfg.num_layers == 2 and module.model.bert.cfg.hidden_size == 128
    for k, v in module.model.bert.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][f"model.bert.{k}"]), k
    assert module.model.classifier.out_features == 3
    with pytest.raises(ValueError, match="vocabulary"):
        SequenceClassificationModule(init_ckpt=str(mlm_ckpt), vocab_size=tokenizer.vocab_size + 1)


@pytest.mark.parametrize(
    "hparams",
    [
        {
            "encoder": {"size": "mini", "hidden": 128, "heads": 2},
            "max_position_embeddings": 128,
        },  # the quickstart
        {
            "encoder": {"size": "tiny", "hidden": 192, "norm_first": True},
        },  # heads from the width, as the MLM module does
    ],
)
def test_mlm_architecture_from_hyperparameters(hparams: dict) -> None:
    mlm = MLMPretrainingModule(vocab_size=120, **hparams)
    assert mlm_bert_config(dict(mlm.hparams)) == mlm.model.cfg


def test_init_from_hf_folder(mlm_ckpt: Path, tmp_path: Path) -> None:
    mlm = MLMPretrainingModule.load_from_checkpoint(mlm_ckpt, map_location="cpu", weights_only=False)
    save_hf_bert(mlm.model, tmp_path / "hf", load_tokenizer(mlm_ckpt))
    module = TokenClassificationModule(init_from_hf=str(tmp_path / "hf"))
    ours = module.model.bert.state_dict()
    for k, v in mlm.model.bert.state_dict().items():
        assert torch.equal(v, ours[k]), k
    assert load_tokenizer(tmp_path / "hf").vocab_size == mlm.model.cfg.vocab_size  # the folder's vocab.txt


# layer-wise lr decay ---------------------------------------------------------------------------------------
def test_llrd_gives_each_layer_its_lr() -> None:
    module = SequenceClassificationModule(vocab_size=100, encoder={"size": "tiny", "layers": 3})
    model, bert = module.model, module.model.bert
    groups = llrd_param_groups(model, bert, lr=1.0, layer_decay=0.5, weight_decay=0.01)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)  # every parameter, once
    assert lr_of[id(bert.embeddings.word.weight)] == (0.5**4, 0.01)  # embeddings: d^(L+1), L = 3
    assert lr_of[id(bert.embeddings.norm.weight)] == (0.5**4, 0.0)  # no decay on LayerNorm
    for layer, block in enumerate(bert.encoder.blocks):
        assert {lr_of[id(p)][0] for p in block.parameters()} == {0.5 ** (3 - layer)}
    assert lr_of[id(model.classifier.weight)][0] == 1.0 and lr_of[id(bert.pooler.weight)][0] == 1.0
    plain = llrd_param_groups(model, bert, lr=1.0, layer_decay=None, weight_decay=0.01)
    assert [g["lr"] for g in plain] == [1.0, 1.0]


# entity spans and scores -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tags, spans",
    [
        # IOB2
        (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
        (["B-PER", "B-PER", "I-PER"], [("PER", 0, 1), ("PER", 1, 3)]),
        # IOB1 (original CoNLL-2003): I- starts an entity, B- only splits two adjacent ones of one type
        (["I-ORG", "I-ORG", "O", "I-LOC"], [("ORG", 0, 2), ("LOC", 3, 4)]),
        (["I-PER", "I-PER", "B-PER", "I-PER"], [("PER", 0, 2), ("PER", 2, 4)]),
        # broken sequences, read as conlleval and seqeval's default do
        (["O", "I-PER", "I-PER"], [("PER", 1, 3)]),
        (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 3)]),
        (["I-MISC"], [("MISC", 0, 1)]),
        (["O", "O"], []),
    ],
)
def test_entity_spans(tags: list[str], spans: list) -> None:
    assert entity_spans(tags) == spans


def test_entity_spans_strict_needs_b() -> None:
    assert entity_spans(["O", "I-PER", "I-PER", "B-LOC", "I-LOC"], strict=True) == [("LOC", 3, 5)]
    assert entity_spans(["B-PER", "I-LOC", "B-PER", "I-PER"], strict=True) == [("PER", 0, 1), ("PER", 2, 4)]
    with pytest.raises(ValueError, match="E-PER"):
        entity_spans(["B-PER", "E-PER"])


def test_entity_f1_matches_hand_counts() -> None:
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    metric = EntityF1(labels)
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O", "B-PER"]]
    pred = [
        ["B-PER", "I-PER", "O", "B-PER"],  # PER exact (tp); LOC as PER: one fp, one fn
        ["B-LOC", "I-LOC", "B-PER"],  # LOC span too long (fp + fn); PER exact (tp)
    ]
    metric.update(pred[:1], gold[:1])
    metric.update([[labels.index(t) for t in pred[1]]], torch.tensor([[labels.index(t) for t in gold[1]]]))
    out = metric.compute()
    # 4 gold, 4 predicted, 2 correct: P = R = F1 = 0.5; PER: 2 correct of 3 predicted, 2 gold; LOC: 0 of 1
    assert torch.isclose(out["precision"], torch.tensor(0.5)) and torch.isclose(
        out["recall"], torch.tensor(0.5)
    )
    assert torch.isclose(out["f1"], torch.tensor(0.5))
    assert torch.isclose(out["f1_PER"], torch.tensor(2 * (2 / 3) * 1.0 / (2 / 3 + 1.0)))
    assert out["f1_LOC"] == 0.0
    metric.reset()
    metric.update([["O", "O"]], [["B-PER", "O"]])  # nothing predicted: 0, not NaN
    assert metric.compute()["f1"] == 0.0


# readers ---------------------------------------------------------------------------------------------------
def test_glue_reader_reports_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text(
        "sentence\tlabel\n"
        'it \'s a "charming" film\t1\n'  # bare quotes stay text (QUOTE_NONE)
        "a line with no label\n"
        "dull\t7\n"
        "bleak and slow\t0\n\n"
    )
    examples, skipped = read_glue_tsv(path, GLUE_TASKS["sst2"])
    assert [(e.texts, e.label) for e in examples] == [
        (('it \'s a "charming" film',), 1),
        (("bleak and slow",), 0),
    ]
    assert len(skipped) == 2
    assert skipped[0].startswith(f"{path}:3:") and skipped[1].startswith(f"{path}:4:")


def test_glue_reader_pairs_and_headerless_files(tmp_path: Path) -> None:
    mrpc = tmp_path / "mrpc.tsv"
    mrpc.write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t11\t12\tHe said .\tShe said .\n")
    (ex,), _ = read_glue_tsv(mrpc, GLUE_TASKS["mrpc"])
    assert ex.texts == ("He said .", "She said .") and ex.label == 1
    cola = tmp_path / "cola.tsv"  # CoLA's train and dev files have no header
    cola.write_text(
        "gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tOne more pseudo generalization.\n"
    )
    examples, skipped = read_glue_tsv(cola, GLUE_TASKS["cola"])
    assert [e.label for e in examples] == [1, 0] and not skipped
    test = tmp_path / "test.tsv"  # test files: an index column and no label
    test.write_text("index\tquestion\tsentence\n7\tWhy?\tBecause.\n")
    (ex,), _ = read_glue_tsv(test, GLUE_TASKS["qnli"], labelled=False)
    assert (ex.index, ex.label, ex.texts) == (7, -1, ("Why?", "Because."))


def test_pair_encoding_segments_and_longest_first_truncation(mlm_ckpt: Path) -> None:
    tok = load_tokenizer(mlm_ckpt)
    a, b = tok.encode_batch(["the film was great", "the plot"])
    ids, types, truncated = encode_texts(tok, [("the film was great", "the plot")], max_length=64)
    assert ids[0] == [tok.cls_id, *a, tok.sep_id, *b, tok.sep_id] and truncated == 0
    assert types[0] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    ids, types, truncated = encode_texts(tok, [("the film was great", "the plot")], max_length=len(b) + 5)
    assert truncated == 1 and len(ids[0]) == len(b) + 5
    assert ids[0] == [tok.cls_id, *a[: len(b) + 5 - 3 - len(b)], tok.sep_id, *b, tok.sep_id]  # only A was cut


def test_conll_reader(tmp_path: Path) -> None:
    path = tmp_path / "eng.train"
    path.write_text(
        "-DOCSTART- -X- -X- O\n\n"
        "EU NNP B-NP I-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP I-MISC\n\n"
        "broken\n\n"  # one column: the sentence is skipped, with its line
        "-DOCSTART- -X- -X- O\n"
        "Peter NNP B-NP I-PER\nBlackburn NNP I-NP I-PER"  # no final newline
    )
    sentences, skipped = read_conll(path)
    assert [(s.words, s.tags) for s in sentences] == [
        (["EU", "rejects", "German"], ["I-ORG", "O", "I-MISC"]),
        (["Peter", "Blackburn"], ["I-PER", "I-PER"]),
    ]
    assert skipped == [f"{path}:7: 1 column(s), expected a token and its tags"]
    assert sentences[1].line == 10


def test_wordpiece_labels_on_first_piece(tmp_path: Path) -> None:
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "mr",
        "black",
        "##burn",
        "went",
        "to",
        "par",
        "##is",
    ]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = TextTokenizer.from_file(tmp_path / "vocab.txt")
    words = ["Mr", "Blackburn", "went", "to", "Paris"]
    ids, positions, truncated = encode_words(tok, [words], max_length=16)
    assert [vocab[i] for i in ids[0]] == [
        "[CLS]",
        "mr",
        "black",
        "##burn",
        "went",
        "to",
        "par",
        "##is",
        "[SEP]",
    ]
    assert positions == [[1, 2, 4, 5, 6]] and truncated == 0
    batch = NERCollator(tok.pad_id)(
        [{"input_ids": ids[0], "word_pos": positions[0], "word_labels": [0, 2, 0, 0, 6]}]
    )
    assert batch["labels"].tolist() == [[-100, 0, 2, -100, 0, 0, 6, -100, -100]]
    # cut to 6 pieces: Paris is lost (position -1, predicted O when scored), "##burn" survives
    ids, positions, truncated = encode_words(tok, [words], max_length=6)
    assert positions == [[1, 2, 4, -1, -1]] and truncated == 1


def test_conll_datamodule_rejects_unknown_tags(tmp_path: Path, mlm_ckpt: Path) -> None:
    (tmp_path / "train.txt").write_text("Oslo NNP B-NP B-GPE\n")
    dm = CoNLLDataModule(
        str(tmp_path),
        tokenizer={"path": str(mlm_ckpt)},
    )
    with pytest.raises(ValueError, match=r"train.txt:1: tag 'B-GPE'"):
        dm._encode("train")


@pytest.mark.skipif(not (REAL / "glue/SST-2/dev.tsv").is_file(), reason="no real GLUE sample")
def test_real_sst2_dev_reads_cleanly() -> None:
    examples, skipped = read_glue_tsv(REAL / "glue/SST-2/dev.tsv", GLUE_TASKS["sst2"])
    assert examples and not skipped


@pytest.mark.parametrize("config", ["sst2.yaml", "mrpc.yaml", "conll2003.yaml"])
def test_configs_take_the_tokenizer_from_init_ckpt(config: str, capsys) -> None:
    path = CONFIGS / "finetune" / config
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path), "--model.init_ckpt=/x/mlm.ckpt", "--print_config"])
    printed = capsys.readouterr().out
    assert "init_ckpt: /x/mlm.ckpt" in printed and "tokenizer:\n      path: /x/mlm.ckpt\n" in printed
