"""rankwise.analyze"""
