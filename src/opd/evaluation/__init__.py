"""Scoring generated images and writing evaluation reports."""
