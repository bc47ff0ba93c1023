"""Fine-tuning modes that produce quantized models (above ``methods`` and ``formats`` in the layering):
``ternary`` trains an ordinary model into a BitNet b1.58 one."""
