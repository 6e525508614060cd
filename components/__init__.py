"""Thin KFP components, one per stage: unpack artifacts, call `unisd.pipeline_steps`."""
