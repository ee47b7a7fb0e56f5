"""edge-runtime: offline Code Llama inference on edge devices.

The device side needs only onnxruntime(-gpu), numpy, tokenizers and paho-mqtt.
"""

__version__ = "0.1.0"
