"""Pipeline parallelism: the GPT as stages of DeepSpeed's pipeline engine (module.py)."""
