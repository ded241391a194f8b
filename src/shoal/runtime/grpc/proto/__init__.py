"""Generated protobuf code for shoal.proto (regenerate with grpcio-tools; never edit by hand)."""
