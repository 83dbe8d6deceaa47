"""Adapters between captum_explaind and model libraries (torchvision, Hugging Face).

Shipped as ``captum_explaind.adapters``; they only translate and never change the mathematics.
"""
