from setuptools import find_packages, setup

setup(
    name="torch-handle",
    version="0.1.0",
    description="Train Transformers from one device to DDP and DeepSpeed ZeRO around a small functional core",
    packages=find_packages(include=["thcore", "thcore.*", "launchers", "recipes"]),
    py_modules=["th"],
    entry_points={"console_scripts": ["th = th:main"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "attrs>=23.1", "fire>=0.5", "orjson>=3.8", "tensorboardX>=2.6",
                      "tokenizers>=0.15", "safetensors>=0.4", "tqdm>=4.60", "sacrebleu>=2.2", "numpy>=1.22"],
    extras_require={
        "deepspeed": ["deepspeed>=0.15"],
        "test": ["pytest>=7", "pytest-timeout>=2", "transformers>=4.40", "tensorboard>=2.10"],
        "wandb": ["wandb>=0.16"],
    },
)
