"""Media preprocessing for the multimodal models: images, videos (lists of frames) and audio.

Each turns user media into exactly what the encoders read, equal to transformers' processors:
image.py and video.py cut pixels into 14-px patches (Qwen2VLImageProcessor), audio.py makes
Whisper log-mel features (WhisperFeatureExtractor). No model weights are involved here.
"""
