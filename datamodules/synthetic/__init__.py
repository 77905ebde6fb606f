"""Generated demo and test sets: captioned shapes (COCO layout), shape classes (ImageFolder), tone speech
(LibriSpeech layout) and the sample Wikipedia/BookCorpus corpus. Nothing here reads user data."""
