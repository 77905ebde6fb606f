"""Text: Wikipedia/BookCorpus readers (corpora), MLM instance preparation, and the MLM, GLUE and CoNLL DataModules."""
