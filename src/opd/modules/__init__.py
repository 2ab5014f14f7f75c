"""LightningModules: orchestration only (sample → targets/rewards → objective → log)."""
