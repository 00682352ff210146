"""Helpers for tests/test_runtimes.py: run real inference runtimes on a model pair.

- ``darknet_cfg``: the YOLO head layers of a .cfg, a batch-1 copy of it, and
  the fixed input.
- ``opencv_runtime``: OpenCV dnn (Caffe and Darknet importers), with the Caffe
  ``Upsample`` layer registered as a Python custom layer; convolution depths.
- ``darknet_runtime``: compile ``darknet_forward.c`` against Debian's libdarknet
  (pjreddie, CPU) and dump the YOLO head inputs of one forward pass.
"""
