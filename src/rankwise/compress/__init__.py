"""rankwise.compress"""
