"""Speech: the LibriSpeech reader and DataModule."""
