"""rankwise.commands"""
