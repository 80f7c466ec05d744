"""Gradio widget of the ES-AUC metric, the entry point of its Hugging Face Space."""

import os

import evaluate
from evaluate.utils import launch_gradio_widget

module = evaluate.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "es_auc.py"))
launch_gradio_widget(module)
