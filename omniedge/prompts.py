"""The fixed prompts omni-mini is trained with, one place for every module that asks it something."""

ASR_PROMPT = "Transcribe the audio."  # every transcription request (training, eval, calibration, runtime)
MIXED_PROMPT = "answer the spoken question about the image."  # a spoken question about a picture
