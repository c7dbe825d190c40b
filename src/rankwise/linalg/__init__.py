"""rankwise.linalg"""
