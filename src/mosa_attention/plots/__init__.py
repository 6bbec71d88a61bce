"""Pictures: loss curves (`mosa plot`) and MoSA selections over a text (`mosa viz`)."""
