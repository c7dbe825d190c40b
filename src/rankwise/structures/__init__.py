"""rankwise.structures"""
