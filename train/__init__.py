"""berttrain: pretrain a BERT from bertprep shards."""
