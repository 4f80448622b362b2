"""Generated protocol code for lossd.v1 (scripts/gen_proto.py); never edited by hand."""
