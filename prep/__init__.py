"""bertprep: turn text into pre-masked, fixed-length BERT training shards."""
