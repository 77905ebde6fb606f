"""The predict loaders of the speech-text DataModules (`audio_text_predict_loaders`, datamodules/predict_data.py):
each module's own batch size setting and error message; the error comes before any tokenizer is needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from datamodules.sections import LoaderConfig, TokenizerConfig
from datamodules.speech.librispeech_datamodule import LibriSpeechDataModule, SpeechPredict
from datamodules.speech.manifest_datamodule import AudioTextDataModule, PredictInputs


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "barks"]) + "\n")
    texts = tmp_path / "texts.txt"
    texts.write_text("a dog barks\n\na dog\nbarks\n")
    return {"vocab": vocab, "texts": texts, "nowhere": tmp_path / "no-such-folder"}


def test_each_module_keeps_its_batch_size_setting_and_pinning(inputs: dict[str, Path]) -> None:
    manifest = AudioTextDataModule(
        predict=PredictInputs(texts=str(inputs["texts"])),
        loader=LoaderConfig(batch_size=8, eval_batch_size=2, num_workers=0, pin_memory=True),
        tokenizer=TokenizerConfig(path=str(inputs["vocab"])),
    )
    (loader,) = manifest.predict_dataloader()
    assert (loader.batch_size, loader.pin_memory) == (2, True)  # loader.eval_size
    batches = list(loader)
    assert [b["text_keys"] for b in batches] == [["texts.txt:1", "texts.txt:3"], ["texts.txt:4"]]
    assert {b["text_kind"] for b in batches} == {"caption"}

    librispeech = LibriSpeechDataModule(
        str(inputs["nowhere"]),  # texts alone need no LibriSpeech tree
        predict=SpeechPredict(texts=str(inputs["texts"]), batch_size=3),
        loader=LoaderConfig(eval_batch_size=2, num_workers=0, pin_memory=True),
        tokenizer=TokenizerConfig(path=str(inputs["vocab"])),
    )
    (loader,) = librispeech.predict_dataloader()
    assert (loader.batch_size, loader.pin_memory) == (3, False)  # predict.batch_size; never pinned
    (batch,) = list(loader)
    assert batch["text_keys"] == ["texts.txt:1", "texts.txt:3", "texts.txt:4"]
    assert batch["text_kind"] == "transcript"


def test_nothing_to_predict_names_each_modules_settings_before_a_tokenizer_is_built(
    inputs: dict[str, Path],
) -> None:
    # no training source and no tokenizer path: building the tokenizer would fail with another error
    with pytest.raises(
        ValueError, match=r"^nothing to predict: set --data\.predict\.split \(train, val or test"
    ):
        AudioTextDataModule().predict_dataloader()
    with pytest.raises(
        ValueError, match=r"^nothing to predict: set --data\.predict\.subsets \(LibriSpeech subsets"
    ):
        LibriSpeechDataModule(str(inputs["nowhere"])).predict_dataloader()
