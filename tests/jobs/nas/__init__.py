"""Tests of jobs/nas."""
