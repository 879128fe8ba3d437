"""The export stage: a checkpoint becomes ONNX graphs per modality plus a manifest (docs/artifacts.md §2).

`bundle.export_bundle` is the entry point; `vision`, `audio` and `thinker` hold one graph wrapper each,
`int4_graph` keeps INT4 weights INT4 inside the graphs, `trt_build` turns a bundle into TensorRT engines.
Imports torch lazily where it can: `omniedge build` on a Jetson needs no torch.
"""
