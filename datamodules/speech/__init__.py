"""Speech: the LibriSpeech reader and DataModule; audio-text manifests, caption CSVs and their DataModule."""
