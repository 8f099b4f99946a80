"""The aimass pipeline service: one spec runs the whole life of a model, stage by stage."""
