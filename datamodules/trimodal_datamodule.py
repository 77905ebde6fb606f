"""Image-text and speech-text batches for one tri-modal model: the COCO and LibriSpeech DataModules composed, with
ONE vocabulary for both, so the text tower sees the same ids for the same words whichever task the text comes
from; for the CPU quickstart, a generated speech set that speaks the generated images' captions."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from datamodules.generated import claim_folder, root_advice, written_whole
from datamodules.image.coco import load_coco_captions
from datamodules.image.coco_datamodule import CocoCaptionsDataModule
from datamodules.sections import TokenizerConfig, as_section, plain_sections
from datamodules.speech.librispeech import subset_transcripts
from datamodules.speech.librispeech_datamodule import LibriSpeechDataModule
from datamodules.synthetic.shapes import generate_shapes_coco
from datamodules.synthetic.tones import render_sentence, tone_lexicon
from datamodules.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

TASKS = ("image_text", "speech_text")  # the order of the evaluation loaders
PAIRS_FILE = "SPOKEN_CAPTIONS.json"
SPOKEN_GENERATOR = "datamodules.trimodal_datamodule.generate_spoken_captions"
_SUBSETS = (("train2017", "train-clean-100"), ("val2017", "dev-clean"))  # COCO split -> LibriSpeech subset
_LEXICON_SEED = 20240917
_TONE_FREQS = np.geomspace(300.0, 3400.0, 16)
_TOKENIZER = TokenizerConfig()


def caption_words(caption: str) -> list[str]:
    """The words a caption is spoken as: letters only, upper case, as LibriSpeech transcripts are written."""
    return re.findall(r"[A-Z]+", caption.upper())


def caption_lexicon(words: Sequence[str]) -> dict[str, list[tuple[float, float]]]:
    """word -> 2 or 3 tones [(Hz, seconds)], unique per word, in `render_sentence`'s format. Shorter tones than
    the tone corpus's (80-120 ms): captions are long sentences and the quickstart runs on a CPU."""
    # sorted: the same word sounds the same whatever the captions
    return tone_lexicon(sorted(set(words)), durations=(0.08, 0.12))


def generate_spoken_captions(
    image_text_root: str | os.PathLike,
    speech_root: str | os.PathLike,
    captions_per_image: tuple[int, int] = (2, 1),
    n_speakers: int = 4,
    sample_rate: int = 16000,
    seed: int = 0,
    setting: str = "data.speech_text.root",
) -> Path:
    """Speak captions of the shapes set as tones into `speech_root/LibriSpeech/{train-clean-100,dev-clean}`;
    returns `speech_root/LibriSpeech`.

    `captions_per_image`: (train, val) captions spoken per image, the first ones of each image. Utterance
    `<speaker>-<chapter>-<n>` of subset s speaks a caption of image `SPOKEN_CAPTIONS.json[s][utterance]`.
    Idempotent and atomic like the tone corpus: an existing tree is kept, a new one is renamed into place. Like
    every generator it writes only into a `speech_root` that does not exist, is empty or carries its marker;
    any other folder raises `ForeignDataError` naming `setting`.
    """
    image_text_root, target = Path(image_text_root), Path(speech_root) / "LibriSpeech"
    if target.is_dir():
        return target
    splits = {
        subset: load_coco_captions(
            image_text_root / "annotations" / f"captions_{split}.json", image_text_root
        )
        for split, subset in _SUBSETS
    }
    lexicon = caption_lexicon(
        [w for records in splits.values() for r in records for c in r.captions for w in caption_words(c)]
    )
    params = {
        "image_text_root": str(image_text_root),
        "captions_per_image": list(captions_per_image),
        "n_speakers": n_speakers,
        "sample_rate": sample_rate,
        "seed": seed,
    }
    claim_folder(speech_root, SPOKEN_GENERATOR, params, root_advice(setting))
    with written_whole(Path(speech_root), SPOKEN_GENERATOR, params, [target.name], target.is_dir) as tmp:
        tree = tmp / target.name
        tree.mkdir()
        pairs: dict[str, dict[str, int]] = {}
        for i, ((subset, records), per_image) in enumerate(zip(splits.items(), captions_per_image)):
            rng = np.random.default_rng([seed, i])
            first = 100 * (i + 1)  # speaker ids differ between subsets
            pitches = {first + s: float(rng.uniform(0.93, 1.07)) for s in range(n_speakers)}  # "voices"
            lines: dict[int, list[str]] = {spk: [] for spk in pitches}
            pairs[subset] = {}
            for n, (record, caption) in enumerate((r, c) for r in records for c in r.captions[:per_image]):
                spk = first + n % n_speakers
                utt_id = f"{spk}-{spk}-{len(lines[spk]):04d}"
                words = caption_words(caption)
                wave = render_sentence(words, sample_rate, rng, pitches[spk], lexicon)
                folder = tree / subset / str(spk) / str(spk)
                folder.mkdir(parents=True, exist_ok=True)
                sf.write(folder / f"{utt_id}.flac", wave, sample_rate, subtype="PCM_16", format="FLAC")
                lines[spk].append(f"{utt_id} {' '.join(words)}\n")
                pairs[subset][utt_id] = record.image_id
            for spk, spoken in lines.items():
                if spoken:
                    (tree / subset / str(spk) / str(spk) / f"{spk}-{spk}.trans.txt").write_text(
                        "".join(spoken)
                    )
        (tree / PAIRS_FILE).write_text(json.dumps(pairs))
    log.info(
        "spoke %s captions of %s as tones into %s",
        {s: len(p) for s, p in pairs.items()},
        image_text_root,
        target,
    )
    return target


class PairedSpeechCollate:
    """The speech collate, plus `image_ids`: the image each utterance's caption describes (-1 for none)."""

    def __init__(self, collate: Any, image_of_utterance: torch.Tensor) -> None:
        self.collate = collate
        self.image_of_utterance = image_of_utterance

    def __call__(self, items: list) -> dict[str, Any]:
        batch = self.collate(items)
        batch["image_ids"] = self.image_of_utterance[batch["utt_keys"]]
        return batch


class TriModalDataModule(LightningDataModule):
    """COCO captions and LibriSpeech together, tokenized with one vocabulary, for `TriModalModule`.

    Shared vocabulary: without `tokenizer.path`, one WordPiece is trained on the COCO training captions together with
    the LibriSpeech training transcripts (cached like every vocabulary here), and both DataModules are configured
    with it through their own `tokenizer` section.

    Batches:

        train  {"image_text": <COCO training batch>, "speech_text": <LibriSpeech training batch>}, one of each per
               step, from Lightning's CombinedLoader (`train_mode`: "min_size" ends the epoch with the shorter
               loader, each loader reshuffled every epoch; "max_size_cycle" runs the longer one to its end and
               restarts the shorter one, which repeats its order within the epoch).
        eval   two loaders, in `TASKS` order: COCO (image-text), then LibriSpeech (speech-text). When the speech
               set is spoken captions (below), each speech batch also holds `image_ids` (B,) long: the image whose
               caption the utterance speaks, -1 for none, so image <-> speech retrieval can be scored.

    Spoken captions, for the CPU quickstart: `generate_if_missing` writes the shapes set
    (datamodules/synthetic/shapes.py) and then a LibriSpeech-format tree whose utterances speak its captions
    as tone patterns (datamodules/synthetic/tones.py `render_sentence`): training utterances speak training
    captions, dev-clean utterances speak validation captions. `SPOKEN_CAPTIONS.json` beside the tree maps each
    utterance to its image, which is what pairs images with speech for evaluation; with real LibriSpeech there
    is no such file and only image-text and speech-text retrieval are reported.

    Needs `Trainer(use_distributed_sampler=False)`, as LibriSpeech alone does: its batch sampler and the COCO
    training sampler shard by rank themselves (under DDP every rank then also evaluates the whole COCO split;
    the retrieval metric keeps one row per key, so the figures are unchanged).
    """

    def __init__(
        self,
        image_text: dict[str, Any] | None = None,
        speech_text: dict[str, Any] | None = None,
        tokenizer: TokenizerConfig = _TOKENIZER,
        train_mode: Literal["min_size", "max_size_cycle"] = "min_size",
        generate_if_missing: bool = False,
        spoken_captions_per_image: tuple[int, int] = (2, 1),
    ) -> None:
        """
        Args:
            image_text: `CocoCaptionsDataModule` arguments (root, images, loader, ...; sections as dicts).
            speech_text: `LibriSpeechDataModule` arguments (root, batching, loader, ...; sections as dicts).
                Both are dicts to the parser: an override of a section replaces all of it, so it names every
                field it needs (`--data.image_text.loader '{batch_size: 8, num_workers: 0}'`).
            tokenizer: the one tokenizer of both tasks: `path` a vocab.txt / tokenizer.json (or folder); None
                trains one WordPiece of `vocab_size` on the COCO training captions and the LibriSpeech training
                transcripts together, cached in `cache_dir` (also both DataModules' cache folder); `lowercase`
                applies to both tasks (LibriSpeech is upper case). The `vocab_size` property gives the size
                trained.
            train_mode: CombinedLoader mode of training: "min_size" or "max_size_cycle" (see the module doc).
            generate_if_missing: write the shapes set into image_text's root and its spoken captions into
                speech_text's root when they are missing (the quickstart); only into roots that are new, empty
                or generated sets, any other is refused.
            spoken_captions_per_image: (train, val) captions of each image spoken in the generated speech set.
        """
        super().__init__()
        self.save_hyperparameters()
        plain_sections(self.hparams)
        self.tokenizer_config = as_section(TokenizerConfig, tokenizer)
        # Arguments, not DataModules: LightningCLI gives every DataModule it instantiates the hyperparameters of
        # the top-level one, so nested DataModules built by the CLI would not know their own settings.
        self._args: dict[str, dict[str, Any]] = {}
        for name, args in (("image_text", image_text), ("speech_text", speech_text)):
            if "tokenizer" in (args or {}):
                raise ValueError(
                    f"data.{name} sets a tokenizer: set it once, as data.tokenizer, for both tasks"
                )
            self._args[name] = dict(args or {})
        # as configured: they give the texts the vocabulary is trained on, and generate the quickstart data
        self._readers: dict[str, LightningDataModule] = {}
        self._tasks: dict[str, LightningDataModule] = {}  # the same, tokenizing with the shared vocabulary
        self._tokenizer: TextTokenizer | None = None
        self._tokenizer_path: str | None = self.tokenizer_config.path

    def _build(self, name: str, tokenizer: str | None) -> LightningDataModule:
        cls = CocoCaptionsDataModule if name == "image_text" else LibriSpeechDataModule
        # built on first use, never in __init__: LightningCLI hands the hyperparameters it instantiates this
        # DataModule with to every `save_hyperparameters` run inside that call, which would give them to these
        return cls(**self._args[name], tokenizer=replace(self.tokenizer_config, path=tokenizer))

    def _reader(self, name: str) -> LightningDataModule:
        if name not in self._readers:
            self._readers[name] = self._build(name, None)
        return self._readers[name]

    # data on disk ------------------------------------------------------------------------------------------
    def _ensure_data(self) -> None:
        if not self.hparams.generate_if_missing:
            return
        coco, speech = self._reader("image_text"), self._reader("speech_text")
        # keeps a complete set, ours or a genuine COCO; refuses any other folder that is not empty
        generate_shapes_coco(coco.root, setting="data.image_text.root")
        if not (speech.root / "LibriSpeech").is_dir():
            generate_spoken_captions(
                coco.root,
                speech.root,
                tuple(self.hparams.spoken_captions_per_image),
                sample_rate=speech.sample_rate,
                seed=speech.seed,
            )

    def _training_texts(self) -> list[str]:
        coco, speech = self._reader("image_text"), self._reader("speech_text")
        captions = [c for r in coco.records("train") for c in r.captions]
        return captions + subset_transcripts(speech.subset_dirs("train"), self.tokenizer_config.lowercase)

    # the shared tokenizer and the two DataModules that use it -------------------------------------------
    @property
    def tokenizer(self) -> TextTokenizer:
        """One vocabulary for captions and transcripts, loaded or trained (and cached) on first use."""
        if self._tokenizer is None:
            if self._tokenizer_path:
                self._tokenizer = TextTokenizer.from_file(
                    self._tokenizer_path, self.tokenizer_config.lowercase
                )
            else:
                self._ensure_data()
                self._tokenizer = self.tokenizer_config.build(self._training_texts)
                self._tokenizer_path = self._tokenizer.source  # the cached tokenizer.json the two tasks load
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def task(self, name: str) -> LightningDataModule:
        """The DataModule of task `name` ("image_text" or "speech_text"), tokenizing with the shared vocabulary."""
        if name not in self._tasks:
            _ = self.tokenizer
            self._tasks[name] = self._build(name, self._tokenizer_path)
            self._tasks[name].trainer = self.trainer  # its epoch and rank, for the seeded samplers
        return self._tasks[name]

    @property
    def image_text(self) -> CocoCaptionsDataModule:
        return self.task("image_text")

    @property
    def speech_text(self) -> LibriSpeechDataModule:
        return self.task("speech_text")

    # LightningDataModule hooks -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self._ensure_data()
        for name in TASKS:
            self.task(name).prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for name in TASKS:
            self.task(name).trainer = self.trainer
            self.task(name).setup(stage)

    def train_dataloader(self) -> CombinedLoader:
        loaders = {name: self.task(name).train_dataloader() for name in TASKS}
        return CombinedLoader(loaders, mode=self.hparams.train_mode)

    def _eval_loaders(self, role: str) -> list[DataLoader]:
        image_text = getattr(self.image_text, f"{role}_dataloader")()

        def paired(collate: Callable) -> Callable:
            image_of_utterance = self._image_of_utterance(role)
            return collate if image_of_utterance is None else PairedSpeechCollate(collate, image_of_utterance)

        return [image_text, self.speech_text.dataloader(role, wrap_collate=paired)]

    def _image_of_utterance(self, role: str) -> torch.Tensor | None:
        """(N,) the image each utterance of the `role` split speaks about, -1 for none; None without pairs."""
        speech = self.speech_text
        pairs_file = speech.librispeech_dir() / PAIRS_FILE
        if not pairs_file.is_file():
            return None
        pairs = json.loads(pairs_file.read_text())
        image_of = {
            utt: image for subset in speech.subsets[role] for utt, image in pairs.get(subset, {}).items()
        }
        keys = [u.key for u in speech.datasets[role].utterances]
        return torch.tensor([image_of.get(k, -1) for k in keys], dtype=torch.long)

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        """The predict loaders of both tasks that have inputs (data.image_text.predict.split, .images, .texts;
        data.speech_text.predict.subsets, .audio, .texts), in one shared space."""
        loaders = [
            loader
            for name in TASKS
            if self.task(name).predicts
            for loader in self.task(name).predict_dataloader()
        ]
        if not loaders:
            raise ValueError(
                "nothing to predict: set data.image_text.predict.split / .images / .texts and/or "
                "data.speech_text.predict.subsets / .audio / .texts"
            )
        return loaders
