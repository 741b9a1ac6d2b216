"""Offline builders that use training: the teacher-output cache, sequence-KD data, sampling a run."""
