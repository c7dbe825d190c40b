"""rankwise.adapt"""
