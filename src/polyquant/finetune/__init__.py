"""Fine-tuning modes that produce quantized models (above ``methods`` and ``formats`` in the layering):
``distill`` is the one distillation loop they share; ``ternary`` trains an ordinary model into a BitNet
b1.58 one; ``codebook`` tunes an AQLM model's code books, scales and norms end to end."""
